"""A circuit against a known true circuit: precision, recall, exact recovery, ROC curve and AUC.

The true circuit is a set of edge names (``ground_truth.json`` of a tracr model: ``{"edges": [...]}``,
or a plain JSON list). The ROC curve ranks every real edge of the graph by the circuit's own score,
largest |score| first (attribution scores, the keep probabilities of Edge Pruning and HAP), and
sweeps the threshold: at each distinct score the true and false positive rates of "every edge
scoring at least this". AUC is the area under it, which equals the chance that a random true edge
outscores a random false one, ties counting half.

A tracr program's true circuit (``program_truth``) depends on the ablation and the task: the
program's circuit read off its weights (``hap.models.tracr.true_edges``: every edge whose reader
reads a residual dimension its source writes) reproduces the model exactly, but some of its edges
change nothing when ablated: under interchange ablation with equal-length corruptions, edges that
carry only positions or the length (the same in both inputs); under any ablation, a read that
does not move its reader (a query of a head that attends uniformly either way) or moves it too
little to change any output. ``minimal_truth`` drops those, one edge at a time, checking each
removal on the task's examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from .ablation import run_masked
from .batches import Batch
from .errors import DataError
from .graph import Graph
from .models.loading import Model
from .models.tracr import NO_VALUE_BELOW, TracrTransformer, true_edges


@dataclass(frozen=True)
class Recovery:
    """How a circuit (its chosen edges and its score ranking) recovers the true circuit."""

    n_true: int
    n_false: int
    n_chosen: int
    true_positives: int
    precision: float
    recall: float
    exact: bool
    auc: float
    roc_fpr: list[float]
    roc_tpr: list[float]

    def as_dict(self) -> dict:
        return {"n_true": self.n_true, "n_false": self.n_false, "n_chosen": self.n_chosen, "true_positives": self.true_positives,
                "precision": self.precision, "recall": self.recall, "exact": self.exact, "auc": self.auc,
                "roc": {"fpr": self.roc_fpr, "tpr": self.roc_tpr}}


def edges_mask(graph: Graph, edges: list[str], origin: str = "the ground truth") -> Tensor:
    """[S, R] bool of named edges; raises ``DataError`` naming the first edge the graph lacks."""
    mask = torch.zeros_like(graph.real)
    for edge in edges:
        source, _, reader = edge.partition("->")
        if source not in graph.source_names or reader not in graph.reader_names:
            raise DataError(f"{origin}: edge {edge!r} is not an edge of this model's graph "
                            "(names look like 'a0.h1->m2' or 'input->a1.h0<q>'); is it a file of another model?")
        s, r = graph.source_names.index(source), graph.reader_names.index(reader)
        if not graph.real[s, r]:
            raise DataError(f"{origin}: {edge!r} goes backwards (its reader runs before its source)")
        mask[s, r] = True
    return mask


def read_ground_truth(path: str | Path, graph: Graph) -> Tensor:
    """The true circuit in ``path`` as a [S, R] bool mask of ``graph``."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"ground truth {path}: not a readable JSON file ({error})") from error
    edges = raw.get("edges") if isinstance(raw, dict) else raw
    if not isinstance(edges, list) or not all(isinstance(edge, str) for edge in edges) or not edges:
        raise DataError(f"ground truth {path}: expected a non-empty list of edge names, or {{\"edges\": [...]}}")
    return edges_mask(graph, edges, f"ground truth {path}")


def roc_curve(scores: Tensor, truth: Tensor) -> tuple[list[float], list[float], float]:
    """(false positive rates, true positive rates, AUC) ranking ``scores`` [E] (higher first) against
    ``truth`` [E] bool; one point per distinct score, from (0, 0) to (1, 1)."""
    n_true, n_false = int(truth.sum()), int((~truth).sum())
    if n_true == 0 or n_false == 0:
        raise DataError("a ROC curve needs at least one true and one false edge")
    order = torch.argsort(scores, descending=True, stable=True)
    ranked, hits = scores[order], truth[order].double()
    cum_true, cum_false = hits.cumsum(0), (1 - hits).cumsum(0)
    last_of_tie = torch.ones_like(ranked, dtype=torch.bool)
    last_of_tie[:-1] = ranked[1:] != ranked[:-1]
    trues = torch.cat([torch.zeros(1, dtype=torch.float64), cum_true[last_of_tie]])
    falses = torch.cat([torch.zeros(1, dtype=torch.float64), cum_false[last_of_tie]])
    # trapezoids (ties count half), summed in whole counts so a perfect ranking gives exactly 1.0
    area = float(((falses[1:] - falses[:-1]) * (trues[1:] + trues[:-1])).sum())
    return (falses / n_false).tolist(), (trues / n_true).tolist(), area / (2 * n_true * n_false)


def recovery(graph: Graph, chosen: Tensor, scores: Tensor, truth: Tensor) -> Recovery:
    """Compare chosen edges [S, R] bool and their scores [S, R] with the true circuit [S, R] bool."""
    real = graph.real
    chosen, truth = chosen & real, truth & real
    true_positives = int((chosen & truth).sum())
    n_chosen, n_true = int(chosen.sum()), int(truth.sum())
    fpr, tpr, auc = roc_curve(scores.abs()[real].double(), truth[real])
    return Recovery(
        n_true=n_true, n_false=int((real & ~truth).sum()), n_chosen=n_chosen, true_positives=true_positives,
        precision=true_positives / n_chosen if n_chosen else 0.0,
        recall=true_positives / n_true,
        exact=bool(torch.equal(chosen, truth)),
        auc=auc, roc_fpr=fpr, roc_tpr=tpr,
    )


def same_outputs(reference_logits: Tensor, logits: Tensor, tolerance: float = 1e-4) -> bool:
    """Whether a run gives the same outputs as the reference at every answer position ([N, V] each): the
    same value of a tracr program's categorical output (its argmax, or no value where every entry is near
    0: ``decode_outputs``), or for one numerical output (V = 1) the same value to ``tolerance``."""
    if logits.shape[-1] == 1:
        return bool(((logits - reference_logits).abs() <= tolerance).all())

    def decoded(rows: Tensor) -> Tensor:
        best, index = rows.max(-1)
        return torch.where(best >= NO_VALUE_BELOW, index, -1)

    return bool((decoded(logits) == decoded(reference_logits)).all())


def minimal_truth(model: Model, graph: Graph, circuit: Tensor, data: Iterable[Batch]) -> Tensor:
    """The edges of ``circuit`` [S, R] (a circuit that gives the model's outputs, like a tracr program's)
    that the ablation of ``data`` needs: one edge at a time, latest reader first (as ACDC sweeps), an edge
    is dropped when the circuit without it still gives the model's outputs on every example
    (``same_outputs``). Edges whose ablation changes no output drop out (a value the ablation puts back
    unchanged, a read that does not move its reader, a tie-breaking term that never flips an answer);
    what is left is sufficient and no single edge of it can go.
    """
    batches = list(data)

    def reproduces(kept: Tensor) -> bool:
        mask = kept.to(model.device, model.dtype)
        with torch.no_grad():
            return all(same_outputs(b.clean_logits, run_masked(model, graph, b.clean, b.reference, mask,
                                                                 positions=b.positions))
                       for b in batches)

    if not reproduces(circuit):
        raise DataError("the program's circuit does not give the model's outputs under this ablation "
                        f"({first_difference(model, graph, circuit, batches)}); every read outside it sees "
                        "dimensions its reader ignores, so this is a bug in the derivation or a file of another model")
    kept = circuit.clone()
    for s, r in sorted(circuit.nonzero().tolist(), key=lambda edge: (-edge[1], -edge[0])):
        kept[s, r] = False
        if not reproduces(kept):
            kept[s, r] = True
    return kept


def first_difference(model: Model, graph: Graph, circuit: Tensor, batches: list[Batch]) -> str:
    """The first example where the circuit's run and the model disagree, in words."""
    mask = circuit.to(model.device, model.dtype)
    for batch in batches:
        with torch.no_grad():
            logits = run_masked(model, graph, batch.clean, batch.reference, mask, positions=batch.positions)
        for i in range(len(logits)):
            if not same_outputs(batch.clean_logits[i:i + 1], logits[i:i + 1]):
                n = int(batch.task.lengths[i])
                return (f"first on input {batch.task.clean_prompts[i]!r} at position {int(batch.positions[i])} of {n}: "
                        f"the model gives {batch.clean_logits[i].tolist()}, the circuit {logits[i].tolist()}")
    return "no single example differs"


def program_truth(model: Model, graph: Graph, data: Iterable[Batch]) -> tuple[Tensor, int]:
    """A tracr model's true circuit under the ablation of ``data`` ([S, R] bool: ``minimal_truth`` of the
    program's circuit), and the size of the program's whole circuit (``true_edges``)."""
    hf_model = model.hf_model
    if not isinstance(hf_model, TracrTransformer):
        raise DataError("only a tracr model knows its true circuit; pass --ground-truth FILE for another model")
    whole = edges_mask(graph, sorted(true_edges(hf_model)), "the program's circuit")
    return minimal_truth(model, graph, whole, data), int(whole.sum())


def judge(model: Model, graph: Graph, chosen: Tensor, scores: Tensor, data: Iterable[Batch],
          ablation: str, truth_file: str | Path | None = None) -> dict:
    """A circuit's recovery of the true circuit, as recorded in ``circuit.json`` under
    ``metrics["ground_truth"]``: the file's circuit if given, else the tracr program's circuit as far as
    the run's ablation needs it on ``data`` (``program_truth``; the whole program's size beside it)."""
    if truth_file is not None:
        truth, described, whole = read_ground_truth(truth_file, graph), str(truth_file), None
    else:
        truth, whole = program_truth(model, graph, data)
        described = f"the program's circuit, what {ablation} ablation needs of it"
    if not bool(truth.any()):
        raise DataError(f"{described}: no edge is needed, so there is nothing to recover; "
                        "use --ablation zero (it needs most edges of a tracr program)")
    names = [f"{graph.source_names[s]}->{graph.reader_names[r]}" for s, r in truth.nonzero().tolist()]
    return {**recovery(graph, chosen.cpu().bool(), scores.cpu().float(), truth).as_dict(),
            "truth": described, "ablation": ablation, "program_edges": whole, "true_edges": names}


def describe_recovery(values: dict) -> str:
    """One summary line, e.g. "13 true edges (the program's ...): precision 1.00 · recall 1.00 · exact yes ·
    AUC 1.000"."""
    whole = values.get("program_edges")
    of_program = f" of the program's {whole}" if whole is not None and whole != values["n_true"] else ""
    return (f"{values['n_true']} true edges{of_program} ({values['truth']}): precision {values['precision']:.2f} · "
            f"recall {values['recall']:.2f} · exact {'yes' if values['exact'] else 'no'} · AUC {values['auc']:.3f}")
