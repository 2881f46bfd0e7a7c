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
from .errors import HapError
from .graph import Graph
from .models import DEFAULT_MODEL, Model, load_model

__version__ = "0.1.0"

__all__ = [
    "AblationKind",
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
