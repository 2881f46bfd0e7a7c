"""hap-circuits: find the circuits of transformer language models.

The data's path: ``load_model`` (adapter) -> ``Graph`` -> ablation
(``run_masked`` with a ``Reference``) -> methods -> evaluation -> report.
"""

from .ablation import (
    AblationKind,
    ComputePlan,
    Reference,
    Trace,
    interchange_reference,
    mean_reference,
    run_masked,
    trace,
    zero_reference,
)
from .acdc import AcdcConfig
from .attribution import AttributionConfig, attribute
from .circuit import Circuit, Scores
from .ensemble import ensemble_run, ensemble_scores
from .errors import HapError
from .evaluation import Metrics, evaluate, faithfulness_curve
from .graph import Graph
from .hybrid import HybridConfig, hybrid
from .models import DEFAULT_MODEL, Model, load_model
from .pruning import PruningConfig, prune
from .tasks import TaskData, TaskSpec, load_split, load_task, task_splits

__version__ = "0.1.0"

__all__ = [
    "AblationKind",
    "AcdcConfig",
    "ensemble_run",
    "ensemble_scores",
    "AttributionConfig",
    "Circuit",
    "HybridConfig",
    "Metrics",
    "PruningConfig",
    "Scores",
    "TaskData",
    "TaskSpec",
    "attribute",
    "evaluate",
    "faithfulness_curve",
    "hybrid",
    "load_split",
    "load_task",
    "task_splits",
    "prune",
    "ComputePlan",
    "DEFAULT_MODEL",
    "Graph",
    "HapError",
    "Model",
    "Reference",
    "Trace",
    "interchange_reference",
    "load_model",
    "mean_reference",
    "run_masked",
    "trace",
    "zero_reference",
]
