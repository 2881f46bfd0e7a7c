"""A circuit against a known true circuit: precision, recall, exact recovery, ROC curve and AUC.

The true circuit is a set of edge names (``ground_truth.json`` of a tracr model: ``{"edges": [...]}``,
or a plain JSON list). The ROC curve ranks every real edge of the graph by the circuit's own score,
largest |score| first (attribution scores, the keep probabilities of Edge Pruning and HAP), and
sweeps the threshold: at each distinct score the true and false positive rates of "every edge
scoring at least this". AUC is the area under it, which equals the chance that a random true edge
outscores a random false one, ties counting half.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import DataError
from .graph import Graph


@dataclass(frozen=True)
class Recovery:
    """How a circuit (its chosen edges and its score ranking) recovers the true circuit."""

    n_true: int
    n_chosen: int
    true_positives: int
    precision: float
    recall: float
    exact: bool
    auc: float
    roc_fpr: list[float]
    roc_tpr: list[float]

    def as_dict(self) -> dict:
        return {"n_true": self.n_true, "n_chosen": self.n_chosen, "true_positives": self.true_positives,
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
    tpr = torch.cat([torch.zeros(1, dtype=torch.float64), cum_true[last_of_tie] / n_true])
    fpr = torch.cat([torch.zeros(1, dtype=torch.float64), cum_false[last_of_tie] / n_false])
    auc = float(((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2).sum())  # trapezoids: ties count half
    return fpr.tolist(), tpr.tolist(), auc


def recovery(graph: Graph, chosen: Tensor, scores: Tensor, truth: Tensor) -> Recovery:
    """Compare chosen edges [S, R] bool and their scores [S, R] with the true circuit [S, R] bool."""
    real = graph.real
    chosen, truth = chosen & real, truth & real
    true_positives = int((chosen & truth).sum())
    n_chosen, n_true = int(chosen.sum()), int(truth.sum())
    fpr, tpr, auc = roc_curve(scores.abs()[real].double(), truth[real])
    return Recovery(
        n_true=n_true, n_chosen=n_chosen, true_positives=true_positives,
        precision=true_positives / n_chosen if n_chosen else 0.0,
        recall=true_positives / n_true,
        exact=bool(torch.equal(chosen, truth)),
        auc=auc, roc_fpr=fpr, roc_tpr=tpr,
    )
