"""Names and defaults known before anything heavy is imported.

``hap --help``, argument errors and unknown model names are answered from here, without importing
torch or transformers (seconds on a small machine). The modules that do the work import these
constants rather than repeating them; ``tests/test_cli_speed.py`` checks both agree.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import urllib.parse
from pathlib import Path

from .errors import ModelNotFoundError

# -- models ------------------------------------------------------------------------------------
DEFAULT_MODEL = "smollm2-135m"
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
TRACR_FORMAT = "hap-tracr/1"
PROGRAMS_DIR = Path(__file__).resolve().parent / "tracr_programs"

# -- methods and discover's defaults ----------------------------------------------------------
ATTRIBUTION_METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations", "exact")
PRUNING_METHODS = ("ep", "hap")
METHODS = ATTRIBUTION_METHODS + PRUNING_METHODS + ("acdc",)
DEFAULT_METHOD = "eap-ig-inputs"
PRECISIONS = ("auto", "int8", "bfloat16", "float16")  # --mixed-precision (PAHQ) for acdc and exact
DEFAULT_N_TEST = 200
DEFAULT_TEST_FRACTION = 0.25  # custom files: the share of examples hashed into the test split
DEFAULT_BATCH_SIZE = 16
DEFAULT_STEPS = 120
DEFAULT_ATTRIBUTION_EXAMPLES = 64
DEFAULT_MONITOR_EXAMPLES = 32
# held-out examples on which discover explains its circuit (node importance, evidence, roles): one batch
DEFAULT_EXPLAIN_EXAMPLES = 16
DEFAULT_REFERENCE_MEMORY_GIB = 1.5


def is_tracr_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` declares the tracr format."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == TRACR_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def shipped_programs() -> list[str]:
    """Names of the compiled programs that ship with hap (``tracr-<name>`` as a model name)."""
    return sorted(p.name for p in PROGRAMS_DIR.iterdir() if is_tracr_dir(p)) if PROGRAMS_DIR.is_dir() else []


def tracr_dir(name_or_path: str) -> Path | None:
    """The directory of a tracr model name (``tracr-reverse``) or path, or None if it is neither."""
    if name_or_path.startswith("tracr-") and (PROGRAMS_DIR / name_or_path.removeprefix("tracr-")).is_dir():
        return PROGRAMS_DIR / name_or_path.removeprefix("tracr-")
    return Path(name_or_path) if is_tracr_dir(name_or_path) else None


def built_in_models() -> tuple[str, ...]:
    """Every model name hap knows without a path or the hub."""
    return (DEFAULT_MODEL, *TINY_MODELS, *(f"tracr-{name}" for name in shipped_programs()))


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds (False when
    ``HF_HUB_OFFLINE`` is set): checked before a hub name is tried, so an offline machine fails at once
    instead of after the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hub_cache(name: str) -> bool:
    """Whether the Hugging Face cache holds a snapshot of repository ``name`` (read from the folder layout)."""
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    return (Path(hub) / f"models--{name.replace('/', '--')}" / "snapshots").is_dir()


def unknown_model(name: str, why: str) -> ModelNotFoundError:
    """The one-line error for a model name hap cannot find, with the closest built-in name if any is close."""
    names = built_in_models()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return ModelNotFoundError(
        f"unknown model '{name}': not a built-in name ({', '.join(names)}), not a local directory, and {why}; "
        f"{hint}check the spelling or pass a path")


def check_model_name(name: str) -> None:
    """Refuse, at once, a model name that is not built in, not a directory, not in the Hugging Face cache,
    while the hub cannot be reached (the case that otherwise costs the hub client's retries)."""
    if name in built_in_models() or Path(name).is_dir() or tracr_dir(name) is not None or _in_hub_cache(name):
        return
    if not hub_reachable():
        raise unknown_model(name, "not in the Hugging Face cache, with the hub unreachable (offline)")
