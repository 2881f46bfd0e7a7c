"""Roles of heads, from rules anyone can read: each is written here once, with its thresholds.

A rule looks at a head's evidence (``hap.evidence``: attention between named positions and direct
effect, on the full model) and, for S-inhibition, at a path-patching measurement. A head takes the
first rule it fits, in the order of ``IOI_RULES``; the others it fits are listed as ``also``. A head
that fits none is "unlabelled": no head is forced into a class. Rules apply to a task that names the
positions they read (IOI's ``IO``, ``S1``, ``S1+1``, ``S2``) with a logit-difference metric; other tasks
get their evidence without labels.

The IOI classes are those of Wang et al. 2022:

* name mover: END attends IO, and the head raises logit(IO) - logit(S) directly;
* negative name mover: END attends IO, and the head lowers it directly;
* S-inhibition: END attends S (S1 and S2 together), and ablating only its edges into the name movers'
  queries (path patching: those queries read its output on the corrupted prompt, everything else is
  the clean run) lowers the logit difference;
* induction: S2 attends S1+1; duplicate-token: S2 attends S1; previous-token: S1+1 attends S1.

One class beyond theirs, so that a head whose main effect is direct is not named after a side pattern:
S-suppression, END attends S and the head raises logit(IO) - logit(S) directly (it lowers the
subject's logit: the copy suppression of McDougall et al. 2023). It is tried after S-inhibition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .ablation import AblationKind
from .batches import ReferenceCache, TaskBatches
from .evaluation import evaluate_masks
from .evidence import EvidenceTable, NodeEvidence
from .graph import Graph
from .models.loading import Model
from .tasks import Metric, TaskData

ATTENTION_MIN = 0.3  # mean attention weight between the rule's two positions
DIRECT_MIN = 0.05  # |direct effect| as a share of the full model's mean logit difference
PATH_PATCHING_MIN = 0.02  # drop of the logit difference, as a share of the full model's, for S-inhibition
UNLABELLED = "unlabelled"
IOI_POSITIONS = ("IO", "S1", "S1+1", "S2", "END")


@dataclass(frozen=True)
class RoleContext:
    """What rules read besides a head's own evidence: the full model's mean metric, and for each head
    tested by path patching, the logit difference it loses (``path_patching``) and the name movers whose
    queries were patched (``patched_into``)."""

    full_metric: float
    path_patching: dict[str, float] = field(default_factory=dict)
    patched_into: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class RoleRule:
    """One class: its name, the rule in words, and the test (the numbers that decide it, then whether
    they pass)."""

    role: str
    rule: str
    numbers: Callable[[NodeEvidence, RoleContext], dict[str, float]]
    fits: Callable[[dict[str, float], RoleContext], bool]


@dataclass(frozen=True)
class Role:
    """A head's label and the numbers that earned it (for "unlabelled": its main evidence)."""

    name: str
    role: str
    evidence: dict[str, float]
    rule: str = ""
    also: list[str] = field(default_factory=list)
    detail: str = ""  # e.g. whose queries path patching patched

    def to_dict(self) -> dict:
        return asdict(self)


def _end_io(node: NodeEvidence, context: RoleContext) -> dict[str, float]:
    return {"END->IO": node.attends("END", "IO"), "direct_effect": node.direct_effect,
            "direct_share": node.direct_effect / context.full_metric}


def _s_inhibition(node: NodeEvidence, context: RoleContext) -> dict[str, float]:
    numbers = {"END->S": node.attends("END", "S2") + node.attends("END", "S1"),
               "END->S2": node.attends("END", "S2")}
    if node.name in context.path_patching:
        numbers["path_patching_drop"] = context.path_patching[node.name]
        numbers["path_patching_share"] = context.path_patching[node.name] / context.full_metric
    return numbers


def _s_suppression(node: NodeEvidence, context: RoleContext) -> dict[str, float]:
    return {"END->S": node.attends("END", "S2") + node.attends("END", "S1"), "direct_effect": node.direct_effect,
            "direct_share": node.direct_effect / context.full_metric}


def _attends(source: str, target: str) -> Callable[[NodeEvidence, RoleContext], dict[str, float]]:
    return lambda node, context: {f"{source}->{target}": node.attends(source, target)}


def _above(key: str) -> Callable[[dict[str, float], RoleContext], bool]:
    return lambda numbers, context: numbers[key] >= ATTENTION_MIN


IOI_RULES: tuple[RoleRule, ...] = (
    RoleRule("name mover", f"END attends IO >= {ATTENTION_MIN} and direct effect >= +{DIRECT_MIN} x the full "
             "model's logit difference", _end_io,
             lambda numbers, context: numbers["END->IO"] >= ATTENTION_MIN and numbers["direct_share"] >= DIRECT_MIN),
    RoleRule("negative name mover", f"END attends IO >= {ATTENTION_MIN} and direct effect <= -{DIRECT_MIN} x the "
             "full model's logit difference", _end_io,
             lambda numbers, context: numbers["END->IO"] >= ATTENTION_MIN and numbers["direct_share"] <= -DIRECT_MIN),
    RoleRule("S-inhibition", f"END attends S1+S2 >= {ATTENTION_MIN}, and patching only its edges into the name "
             f"movers' queries lowers the logit difference by >= {PATH_PATCHING_MIN} x the full model's",
             _s_inhibition,
             lambda numbers, context: numbers["END->S"] >= ATTENTION_MIN
             and numbers.get("path_patching_share", 0.0) >= PATH_PATCHING_MIN),
    RoleRule("S-suppression", f"END attends S1+S2 >= {ATTENTION_MIN} and direct effect >= +{DIRECT_MIN} x the full "
             "model's logit difference (it lowers the subject's logit: copy suppression, McDougall et al. 2023)",
             _s_suppression,
             lambda numbers, context: numbers["END->S"] >= ATTENTION_MIN and numbers["direct_share"] >= DIRECT_MIN),
    RoleRule("induction", f"S2 attends S1+1 >= {ATTENTION_MIN}", _attends("S2", "S1+1"), _above("S2->S1+1")),
    RoleRule("duplicate-token", f"S2 attends S1 >= {ATTENTION_MIN}", _attends("S2", "S1"), _above("S2->S1")),
    RoleRule("previous-token", f"S1+1 attends S1 >= {ATTENTION_MIN}", _attends("S1+1", "S1"), _above("S1+1->S1")),
)


def rules_apply(task: TaskData | EvidenceTable) -> bool:
    """Whether the IOI rules read this task: it names IOI's positions (and scores a logit difference)."""
    positions = task.positions if isinstance(task, EvidenceTable) else list(task.named())
    metric_ok = isinstance(task, EvidenceTable) or task.metric is Metric.LOGIT_DIFF
    return metric_ok and all(label in positions for label in IOI_POSITIONS)


def label_heads(evidence: EvidenceTable, context: RoleContext,
                rules: tuple[RoleRule, ...] = IOI_RULES) -> dict[str, Role]:
    """Every head's role under ``rules`` (first fit wins; the rest are ``also``)."""
    roles = {}
    for node in evidence.nodes:
        if node.kind != "head":
            continue
        fitted = []
        for rule in rules:
            numbers = rule.numbers(node, context)
            if rule.fits(numbers, context):
                fitted.append((rule, numbers))
        if fitted:
            rule, numbers = fitted[0]
            detail = ""
            if "path_patching_drop" in numbers:
                detail = "patched into the queries of " + ", ".join(context.patched_into.get(node.name, []))
            roles[node.name] = Role(node.name, rule.role, _rounded(numbers), rule.rule,
                                    [other.role for other, _ in fitted[1:]], detail)
        else:
            summary = {**_end_io(node, context), **_s_inhibition(node, context)}
            roles[node.name] = Role(node.name, UNLABELLED, _rounded(summary))
    return roles


def _rounded(numbers: dict[str, float]) -> dict[str, float]:
    return {key: round(float(value), 4) for key, value in numbers.items()}


def s_inhibition_candidates(evidence: EvidenceTable, name_movers: list[str]) -> dict[str, list[str]]:
    """Heads that pass S-inhibition's attention test, each with the name movers of later layers (whose
    queries it can reach)."""
    layers = {node.name: node.layer for node in evidence.nodes}
    candidates = {}
    for node in evidence.nodes:
        if node.kind != "head" or node.attends("END", "S2") + node.attends("END", "S1") < ATTENTION_MIN:
            continue
        later = [mover for mover in name_movers if layers[mover] > node.layer]
        if later:
            candidates[node.name] = later
    return candidates


def path_patching(model: Model, task: TaskData, senders: dict[str, list[str]], batch_size: int = 16,
                  data: TaskBatches | None = None) -> dict[str, float]:
    """For each sender head, how much the full model's mean logit difference drops when only its edges
    into the queries of its receivers (heads) read its output on the corrupted prompt (interchange
    ablation; one masked run of the full graph per sender and batch)."""
    if not senders:
        return {}
    graph = Graph.from_model(model)
    data = data if data is not None else TaskBatches(model, graph, task, batch_size, AblationKind.INTERCHANGE,
                                                     cache=ReferenceCache())
    masks = []
    for sender, receivers in senders.items():
        mask = graph.real.clone()
        source = graph.source_index(sender)
        for receiver in receivers:
            mask[source, graph.reader_index(f"{receiver}<q>")] = False
        masks.append(mask)
    results, full, _, _ = evaluate_masks(model, graph, data, masks, AblationKind.INTERCHANGE, False, "path patching",
                                         len(task))
    return {sender: full["logit_diff"] - values["logit_diff"] for sender, values in zip(senders, results)}


def head_roles(model: Model, task: TaskData, evidence: EvidenceTable, batch_size: int = 16,
               data: TaskBatches | None = None) -> dict[str, Role] | None:
    """The role of every head of ``model`` on ``task`` (None when no rules read this task): the rules on the
    evidence, with path patching for the S-inhibition candidates. ``data``: interchange batches of ``task``
    to reuse."""
    if not rules_apply(task):
        return None
    context = RoleContext(evidence.full_metric)
    first = label_heads(evidence, context)
    movers = [name for name, role in first.items() if role.role == "name mover"]
    candidates = s_inhibition_candidates(evidence, movers)
    with torch.no_grad():
        drops = path_patching(model, task, candidates, batch_size, data)
    return label_heads(evidence, RoleContext(evidence.full_metric, drops, candidates))
