"""Reduced precision for the components a patching method is not investigating (PAHQ, Wang et al. 2025).

An exact test (ACDC, exact patching) removes edges into one reader and measures the change; PAHQ computes
the investigated component in full precision and the rest of the network in reduced precision. Here the
investigated component is the tested reader's block (its layer's attention, its MLP, or the logits),
a superset of PAHQ's single head. ``ReducedTwin`` (``hap.twin``) is a second adapter over a reduced copy
of the model; the masked run computes every other block's sources with it (inputs cast down, outputs cast
back up).

What "reduced" means depends on the device and is chosen only where it is faster:

* CUDA: ``float16`` or ``bfloat16`` copies of the whole model (``auto``: whichever answers the task's first
  examples closer to the model);
* CPU: ``int8``, dynamically quantised MLP linear layers (attention keeps its float32 per-head
  weights, which the graph slices head by head). bf16/fp16 arithmetic is emulated on CPUs without
  AVX-512-BF16/AMX and runs several times slower (``benchmarks/precision.py``).

``reduced_twin`` refuses a precision that is slower here (it times one MLP both ways) and, given a sample
of the task, one that moves the full model's answer distribution by more than ``MAX_TWIN_KL`` nats: a
circuit of a different model is not a circuit of this one. (Dynamic int8 MLPs move SmolLM2-135M's IOI
answers by 1.2-1.6 nats: refused; ``benchmarks/acdc_cost.py``.) ACDC also refuses a twin further from the
model than its tau (``check_twin_below_threshold``): on SmolLM2 IOI bfloat16 moves the answers 7e-4 nats,
and at tau 3e-4 it changed 656 of the first 21,273 decisions of a float32 sweep (float16: 1e-5 nats).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings

import torch

from .batches import Batch, kl_divergence
from .errors import HapError
from .models.adapter import ModelAdapter
from .models.loading import Model, adapter_for
from .models.placement import placed
from .plain_run import answer_logits
from .settings import PRECISIONS
from .twin import ReducedTwin

MAX_TWIN_KL = 0.01  # nats: how far the reduced full model may move the answer distribution


def _quantised_mlps(model: Model) -> torch.nn.Module:
    """A copy of the model whose MLP linear layers are dynamically quantised to int8 (CPU only)."""
    names = {name for name, module in model.hf_model.named_modules() if name.endswith(".mlp")}
    if not names:
        raise HapError(f"--mixed-precision int8: found no MLP modules in {model.name}")
    twin = copy.deepcopy(model.hf_model)
    spec = {name: torch.ao.quantization.per_channel_dynamic_qconfig for name in names}
    with warnings.catch_warnings():  # torch.ao's eager quantisation announces its move to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        twin = torch.ao.quantization.quantize_dynamic(twin, spec, dtype=torch.qint8)
    if not any(isinstance(module, torch.ao.nn.quantized.dynamic.Linear) for module in twin.modules()):
        raise HapError(f"--mixed-precision int8 quantises nn.Linear layers, and the MLPs of {model.name} have none "
                       "(GPT-2 writes them as Conv1D); leave it off on this model")
    return twin


def _mlp_seconds(adapter: ModelAdapter, dtype: torch.dtype, d_model: int, device: torch.device,
                 rows: int = 320) -> float:
    """Seconds one MLP takes on ``rows`` token positions (a GPU's verdict depends on the size: small inputs
    are bound by kernel launches, where a reduced twin's casts cost more than its products save)."""
    x = torch.randn(1, rows, d_model, device=device).to(dtype)
    with torch.no_grad():
        adapter.mlp(0, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(5):
            adapter.mlp(0, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / 5


def check_twin_below_threshold(model: Model, twin: ReducedTwin, sample: Batch, threshold: float) -> None:
    """Refuse a twin whose rounding alone moves the answers (KL, nats) by more than ACDC's ``threshold``:
    its noise, not the edges, would decide the tests."""
    divergence = twin.divergence if twin.divergence is not None else twin_divergence(model, twin, sample)
    if divergence > threshold:
        raise HapError(f"--mixed-precision {twin.kind}: the model in {twin.kind} answers the task's first examples "
                       f"{divergence:.2g} nats from float32, more than tau {threshold:g}, so its rounding, not the "
                       "edges, would decide the tests (SmolLM2 IOI, bfloat16 at tau 3e-4: 656 of 21,273 decisions "
                       "differed from float32); raise tau, use a closer precision (float16 moves SmolLM2's IOI "
                       "answers 1e-5 nats, bfloat16 7e-4), or leave it off")


def twin_divergence(model: Model, twin: ReducedTwin, sample: Batch) -> float:
    """Mean KL(model || twin) of the answer distributions of a batch (its full-model logits when it has them)."""
    positions = sample.positions.to(model.device)
    full = sample.clean_logits if sample.clean_logits is not None else answer_logits(model, sample.clean, positions)
    rows = torch.arange(len(sample.clean), device=model.device)
    with torch.no_grad():
        reduced = twin.adapter.hf_model(sample.clean.to(model.device)).logits[rows, positions]
    return float(kl_divergence(full, reduced).mean())


def _build_twin(model: Model, kind: str) -> ReducedTwin:
    """The twin of one precision (int8: quantised MLPs, CPU only; bfloat16/float16: a half copy)."""
    if kind == "int8":
        if model.device.type != "cpu":
            raise HapError("--mixed-precision int8 (dynamic quantisation) runs on CPU only; on CUDA use bfloat16")
        twin_model, dtype = _quantised_mlps(model), torch.float32
    else:
        dtype = getattr(torch, kind)
        twin_model = copy.deepcopy(model.hf_model).to(dtype)
    twin_adapter = placed(adapter_for(twin_model, model.name), model.device)  # a model over devices: its twin too
    return ReducedTwin(kind, twin_adapter.ungrouped() if model.layout.kv_ungrouped else twin_adapter, dtype)


def _closest_half_twin(model: Model, sample: Batch) -> ReducedTwin:
    """``auto`` on CUDA: of the float16 and bfloat16 twins, the one whose answers are closer to the model's
    (equally fast on tensor cores; float16 keeps 3 more mantissa bits, bfloat16 the range: SmolLM2's IOI
    answers move 1e-5 nats in float16 and 7e-4 in bfloat16, and a float16 overflow reads as infinitely far)."""
    best: ReducedTwin | None = None
    for kind in ("float16", "bfloat16"):
        twin = _build_twin(model, kind)
        divergence = twin_divergence(model, twin, sample)
        divergence = divergence if math.isfinite(divergence) else math.inf
        if best is None or divergence < best.divergence:
            best = dataclasses.replace(twin, divergence=divergence)
    return best


def reduced_twin(model: Model, kind: str = "auto", check_speed: bool = True,
                 sample: Batch | None = None, rows: int = 320) -> ReducedTwin:
    """Build the reduced twin of ``model`` (``kind``: auto = int8 on CPU; on CUDA the closer of float16 and
    bfloat16 to the model on ``sample``, bfloat16 without one). With
    ``check_speed``, refuse a precision whose MLP runs slower than the model's own on this machine; with a
    ``sample`` batch of the task, one whose full model is further than ``MAX_TWIN_KL`` from the model's.
    ``rows``: the token positions one forward computes (ACDC: tests per forward x batch x tokens), the size
    the speed is judged at."""
    if kind not in PRECISIONS:
        raise HapError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {kind!r}")
    device = model.device
    if model.weights_dtype != torch.float32:
        raise HapError(f"--mixed-precision reduces a float32 model; {model.name} is loaded in {model.weights_dtype} "
                       "already")
    if model.origin == "tracr":
        raise HapError("--mixed-precision: tracr models compute exactly in float32 and are tiny; leave it off")
    if kind == "auto" and device.type == "cuda" and sample is not None:
        twin = _closest_half_twin(model, sample)
    else:
        if kind == "auto":
            kind = "bfloat16" if device.type == "cuda" else "int8"
        twin = _build_twin(model, kind)
    kind = twin.kind
    if check_speed:
        full = _mlp_seconds(model.adapter, model.dtype, model.layout.d_model, device, rows)
        reduced = _mlp_seconds(twin.adapter, twin.dtype, model.layout.d_model, device, rows)
        if reduced >= full:
            better = "leave it off" if device.type == "cpu" and kind == "int8" else \
                ("use --mixed-precision int8 or leave it off" if device.type == "cpu" else "leave it off")
            raise HapError(f"--mixed-precision {kind}: on this {device.type} one MLP takes {reduced * 1e3:.2f} ms in "
                           f"{kind} against {full * 1e3:.2f} ms in float32 on {rows:,} token positions, so it would "
                           f"slow the run down; {better}")
    if sample is not None:
        divergence = twin.divergence if twin.divergence is not None else twin_divergence(model, twin, sample)
        twin = dataclasses.replace(twin, divergence=divergence)
        if divergence > MAX_TWIN_KL:
            raise HapError(f"--mixed-precision {kind}: the model in {kind} answers the task's first examples with "
                           f"KL {divergence:.3g} nats from float32 (at most {MAX_TWIN_KL} allowed), so tests on it "
                           "would judge another model; leave it off" + (", or use bfloat16 on a GPU"
                                                                       if device.type == "cpu" else ""))
    return twin
