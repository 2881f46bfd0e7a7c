"""A circuit explained: each of its heads and MLPs with how much the circuit needs it (``importance``),
what it does (``evidence``) and its role under the task's rules (``roles``), in one table.

Importance is measured in the circuit; evidence and roles in the full model (what a component does,
whichever circuit keeps it), on the same held-out examples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .ablation import AblationKind
from .batches import TaskBatches
from .circuit import Circuit
from .display import explanation_html
from .evidence import EvidenceTable, NodeEvidence, node_evidence
from .importance import ImportanceTable, NodeImportance, node_importance
from .models.loading import Model
from .roles import IOI_RULES, Role, RoleRule, head_roles
from .tasks import TaskData

SHOWN_PAIRS = 2  # attention pairs shown per head in the text table: the strongest ones


@dataclass(frozen=True)
class NodeExplanation:
    """One node of the circuit: its importance row, its evidence, and its role (None: no rules for this
    task, or an MLP)."""

    importance: NodeImportance
    evidence: NodeEvidence
    role: Role | None

    @property
    def name(self) -> str:
        return self.importance.name

    def evidence_text(self) -> str:
        """The numbers behind a row: the role's own, else the strongest attention pairs; then the readers."""
        parts = []
        if self.role is not None and self.role.role != "unlabelled":
            parts.append(", ".join(f"{key} {value:+.2f}" if "direct" in key or "drop" in key else f"{key} {value:.2f}"
                                   for key, value in self.role.evidence.items() if not key.endswith("_share")))
            if self.role.also:
                parts.append("also " + ", ".join(self.role.also))
        elif self.evidence.attention:
            pairs = sorted(((weight, f"{source}->{target}") for source, row in self.evidence.attention.items()
                            for target, weight in row.items() if source != target), reverse=True)[:SHOWN_PAIRS]
            parts.append(", ".join(f"{pair} {weight:.2f}" for weight, pair in pairs))
        readers = self.evidence.readers
        if readers:
            parts.append("read by " + " ".join(f"{kind}:{len(names)}" for kind, names in readers.items()))
        return "; ".join(parts)


@dataclass(frozen=True)
class Explanation:
    """The importance table of a circuit with the evidence and roles of its nodes."""

    importance: ImportanceTable
    evidence: EvidenceTable
    roles: dict[str, Role] | None  # every head of the model (None: no rules read this task)

    def nodes(self) -> list[NodeExplanation]:
        """The circuit's nodes, most important first."""
        return [NodeExplanation(row, self.evidence.node(row.name), (self.roles or {}).get(row.name))
                for row in self.importance.nodes]

    @property
    def rules(self) -> tuple[RoleRule, ...]:
        """The rules the roles were read by (none when no rules read this task)."""
        return IOI_RULES if self.roles is not None else ()

    def role_counts(self) -> dict[str, int]:
        """How many of the circuit's heads hold each role."""
        counts: dict[str, int] = {}
        for node in self.nodes():
            if node.role is not None:
                counts[node.role.role] = counts.get(node.role.role, 0) + 1
        return counts

    def to_json(self) -> dict[str, Any]:
        """``{"nodes": [{"name", "kind", "layer", "role", "importance", "evidence"}, ...], ...}``."""
        rows = []
        for node in self.nodes():
            evidence = asdict(node.evidence)
            evidence.pop("example_attention")
            rows.append({"name": node.name, "kind": node.importance.kind, "layer": node.importance.layer,
                         "role": node.role.role if node.role else None,
                         "importance": {key: value for key, value in asdict(node.importance).items()
                                        if key not in ("name", "kind", "layer")},
                         "evidence": {**evidence, **({"role": node.role.to_dict()} if node.role else {})}})
        header = {key: value for key, value in self.evidence.to_dict().items() if key != "nodes"}
        return {"nodes": rows, "evidence": header,
                "rules": [{"role": rule.role, "rule": rule.rule} for rule in IOI_RULES] if self.roles else []}

    def _repr_html_(self) -> str:
        """Jupyter's view: the roles table, 20 rows (``hap.display``)."""
        return explanation_html(self)

    def format(self, top: int | None = 20) -> str:
        """The roles table as text: rank, node, role, importance, then the evidence numbers."""
        table, evidence = self.importance, self.evidence
        where = {"test": "held-out test", "train": "training (in-sample)"}.get(table.split, table.split)
        lines = [f"circuit on {table.n_examples} {where} examples: faithfulness {table.faithfulness:.4f}, KL "
                 f"{table.kl:.4f}. Importance: what the circuit loses without the node and its edges "
                 f"({table.ablation} ablation). Evidence, on the full model: attention between named positions "
                 f"({', '.join(evidence.positions)}) and the direct effect (linear estimate, full-model metric "
                 f"{evidence.full_metric:+.3f}).",
                 f"{'rank':>4}  {'node':<9}{'role':<21}{'faithfulness lost':>18}{'KL added':>10}"
                 + (f"{'attribution':>12}" if table.attribution_method else "") + f"{'direct':>9}  evidence"]
        for node in self.nodes()[:top]:
            row = node.importance
            role = node.role.role if node.role else ("-" if row.kind == "mlp" or self.roles is None else "")
            attribution = ""
            if table.attribution_method:
                attribution = f"{row.attribution:>+12.4f}" if row.attribution is not None else f"{'':>12}"
            lines.append(f"{row.rank:>4}  {row.name:<9}{role:<21}{row.faithfulness_drop:>+18.4f}"
                         f"{row.kl_increase:>+10.4f}{attribution}{node.evidence.direct_effect:>+9.3f}  "
                         f"{node.evidence_text()}")
        if top is not None and len(table.nodes) > top:
            lines.append(f"  ... {len(table.nodes) - top} more nodes (--top N, or --json for all)")
        if table.attribution_method:
            lines.append(f"attribution: the sum of the node's outgoing {table.attribution_method} edge scores, a linear "
                         "estimate of the change of the metric when the node is ablated")
        if self.roles is not None:
            counts = self.role_counts()
            lines.append("roles in the circuit: " + (", ".join(f"{role} {count}" for role, count in counts.items())
                                                     or "none"))
            lines += [f"  {rule.role}: {rule.rule}" for rule in IOI_RULES]
        else:
            lines.append("no role rules for this task (they read IOI's named positions): evidence only")
        return "\n".join(lines)


def explain_circuit(model: Model, circuit: Circuit, task: TaskData, batch_size: int = 16,
                    ablation: AblationKind | str | None = None, data: TaskBatches | None = None,
                    split: str = "test", progress: bool = False) -> Explanation:
    """Importance, evidence and roles of ``circuit``'s nodes on ``task`` (a held-out split, normally).
    ``data``: the circuit's batches of ``task`` (``TaskBatches``), reused for importance and, under
    interchange ablation, for path patching."""
    importance = node_importance(model, circuit, task, batch_size, ablation, data=data, split=split,
                                 progress=progress)
    evidence = node_evidence(model, task, batch_size, kept=circuit.in_graph, split=split)
    interchange = data if data is not None and importance.ablation == AblationKind.INTERCHANGE.value else None
    roles = head_roles(model, task, evidence, batch_size, data=interchange)
    return Explanation(importance, evidence, roles)


def store_explanation(circuit: Circuit, explanation: Explanation, extra: dict[str, Any] | None = None) -> None:
    """Put the explanation into ``circuit`` (written with it to ``circuit.json``): the importance table, the
    evidence of the circuit's nodes and the roles of its heads."""
    circuit.importance = {**explanation.importance.to_dict(), "extra": extra or {}}
    names = {row.name for row in explanation.importance.nodes}
    evidence = explanation.evidence.to_dict()
    evidence["nodes"] = [node for node in evidence["nodes"] if node["name"] in names]
    circuit.evidence = evidence
    circuit.roles = None if explanation.roles is None else \
        {name: role.to_dict() for name, role in explanation.roles.items() if name in names}


def load_explanation(circuit: Circuit) -> Explanation | None:
    """The explanation stored in ``circuit`` (None unless importance and evidence both are)."""
    if circuit.importance is None or circuit.evidence is None:
        return None
    roles = None if circuit.roles is None else {name: Role(**role) for name, role in circuit.roles.items()}
    return Explanation(ImportanceTable.from_dict(circuit.importance), EvidenceTable.from_dict(circuit.evidence), roles)
