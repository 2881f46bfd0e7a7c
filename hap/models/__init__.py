"""Model adapters: Hugging Face weights run as sources and readers of the edge graph."""

from .adapter import Layout, ModelAdapter, RunContext
from .loading import BUILT_IN_MODELS, DEFAULT_MODEL, Model, load_model

__all__ = ["BUILT_IN_MODELS", "DEFAULT_MODEL", "Layout", "Model", "ModelAdapter", "RunContext", "load_model"]
