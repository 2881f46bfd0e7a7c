"""hap-circuits: find the circuits of transformer language models.

The data's path: ``load_model`` (adapter) -> ``Graph`` -> ablation
(``run_masked`` with a ``Reference``) -> methods -> evaluation -> explanation
(importance, evidence, roles) -> report.

Names are imported on first use, so ``hap --help`` does not wait for torch.
"""

from __future__ import annotations

from .lazy import lazy_attributes

__version__ = "0.1.0"

# name -> the submodule that defines it; imported on first use (PEP 562)
_EXPORTS = {
    "AblationKind": ".ablation",
    "ComputePlan": ".ablation",
    "Reference": ".ablation",
    "Trace": ".ablation",
    "interchange_reference": ".ablation",
    "mean_reference": ".ablation",
    "run_masked": ".ablation",
    "trace": ".ablation",
    "zero_reference": ".ablation",
    "AcdcConfig": ".acdc",
    "AttributionConfig": ".attribution",
    "attribute": ".attribution",
    "Circuit": ".circuit",
    "Scores": ".circuit",
    "ensemble_run": ".ensemble",
    "ensemble_scores": ".ensemble",
    "HapError": ".errors",
    "WeakModelError": ".errors",
    "FullModelCheck": ".evaluation",
    "Metrics": ".evaluation",
    "check_full_model": ".evaluation",
    "evaluate": ".evaluation",
    "require_capable_model": ".evaluation",
    "faithfulness_curve": ".evaluation",
    "EvidenceTable": ".evidence",
    "NodeEvidence": ".evidence",
    "node_evidence": ".evidence",
    "Explanation": ".explain",
    "explain_circuit": ".explain",
    "Graph": ".graph",
    "Role": ".roles",
    "head_roles": ".roles",
    "ImportanceTable": ".importance",
    "NodeImportance": ".importance",
    "node_importance": ".importance",
    "HybridConfig": ".hybrid",
    # HAP's entry point is hap.hybrid.hybrid; a package attribute named like its submodule would be replaced
    # by the submodule whenever that is imported first, so the package exports it as run_hap.
    "run_hap": ".hybrid",
    "DEFAULT_MODEL": ".models",
    "Model": ".models",
    "load_model": ".models",
    "PruningConfig": ".pruning",
    "prune": ".pruning",
    "TaskData": ".tasks",
    "TaskSpec": ".tasks",
    "load_split": ".tasks",
    "load_task": ".tasks",
    "task_splits": ".tasks",
}

__all__ = [
    "AblationKind",
    "AcdcConfig",
    "ensemble_run",
    "ensemble_scores",
    "AttributionConfig",
    "Circuit",
    "HybridConfig",
    "FullModelCheck",
    "Metrics",
    "PruningConfig",
    "Scores",
    "TaskData",
    "TaskSpec",
    "attribute",
    "check_full_model",
    "evaluate",
    "faithfulness_curve",
    "run_hap",
    "node_importance",
    "EvidenceTable",
    "NodeEvidence",
    "node_evidence",
    "Explanation",
    "explain_circuit",
    "Role",
    "head_roles",
    "load_split",
    "load_task",
    "task_splits",
    "prune",
    "ComputePlan",
    "DEFAULT_MODEL",
    "Graph",
    "HapError",
    "Model",
    "WeakModelError",
    "require_capable_model",
    "Reference",
    "Trace",
    "interchange_reference",
    "load_model",
    "mean_reference",
    "run_masked",
    "trace",
    "zero_reference",
]


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
