"""The fused RMS norm + head projection against the norm module followed by the projection (its slow twin)."""

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import hap
from hap.ablation import run_masked, zero_reference
from hap.models.normed import rms_normed_projection, rms_parameters
from hap.probes import ReaderProbes

WIDTH, HEADS, HEAD_WIDTH = 12, 3, 4


def _norm(kind: str) -> torch.nn.Module:
    norm = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm}[kind](WIDTH, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 1.5, WIDTH, dtype=torch.float64))
    return norm


def _twin(norm, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    normed = norm(x)
    out = (torch.einsum("btd,dhk->bhtk", normed[0], weight) if x.shape[0] == 1
           else torch.einsum("hbtd,dhk->bhtk", normed, weight))
    return out if bias is None else out + bias[None, :, None, :]


@pytest.mark.parametrize("kind", ["llama", "gemma"])
@pytest.mark.parametrize("shared", [True, False])  # one input for every head, or one per head
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_projection_equals_norm_then_projection_with_its_gradient(kind, shared, with_bias, monkeypatch):
    monkeypatch.setattr("hap.models.normed.FUSED_DTYPES", (torch.float64,))  # the math, checked in float64
    generator = torch.Generator().manual_seed(0)
    norm = _norm(kind)
    weight = torch.randn(WIDTH, HEADS, HEAD_WIDTH, generator=generator, dtype=torch.float64)
    bias = torch.randn(HEADS, HEAD_WIDTH, generator=generator, dtype=torch.float64) if with_bias else None
    x = (torch.randn(1 if shared else HEADS, 2, 5, WIDTH, generator=generator, dtype=torch.float64) + 0.3)
    upstream = torch.randn(2, HEADS, 5, HEAD_WIDTH, generator=generator, dtype=torch.float64)
    parameters = rms_parameters(norm, WIDTH, x.device, x.dtype)
    assert parameters is not None
    # Twins: the module itself (Hugging Face norms in float32 even in a float64 model: the gain read off it
    # is float32-rounded too) and the RMS formula written out in float64 with that gain.
    gain, eps = parameters
    assert torch.allclose(gain, (norm.weight + 1) if kind == "gemma" else norm.weight, rtol=1e-6)
    written_out = lambda v: gain * v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    for twin, tolerance in ((norm, 1e-5), (written_out, 1e-12)):
        fast_x, slow_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        fast = rms_normed_projection(fast_x, *parameters, weight, bias)
        slow = _twin(twin, slow_x, weight, bias)
        assert torch.allclose(fast, slow, atol=tolerance * float(slow.detach().abs().max()))
        (fast * upstream).sum().backward()
        (slow * upstream).sum().backward()
        assert float(slow_x.grad.abs().max()) > 1e-3
        assert torch.allclose(fast_x.grad, slow_x.grad, atol=tolerance * float(slow_x.grad.abs().max()))


def test_only_rms_norms_in_float32_take_the_fused_path():
    cpu = torch.device("cpu")
    assert rms_parameters(torch.nn.LayerNorm(WIDTH), WIDTH, cpu, torch.float32) is None
    assert rms_parameters(lambda x: x, WIDTH, cpu, torch.float32) is None  # no eps: an identity
    norm = LlamaRMSNorm(WIDTH)
    assert rms_parameters(norm, WIDTH, cpu, torch.float32) is not None
    # float64 follows Hugging Face's module (which norms in float32) bit for bit; reduced precision too
    assert rms_parameters(norm.double(), WIDTH, cpu, torch.float64) is None
    assert rms_parameters(norm.to(torch.bfloat16), WIDTH, cpu, torch.bfloat16) is None


def test_a_llama_model_reads_through_the_fused_path_and_matches_its_own_forward(tiny_llama):
    # Not vacuous: the tiny Llama's attention norms are fused; with every edge on the run equals the model's.
    adapter = tiny_llama.adapter
    assert rms_parameters(adapter.attention[0].norm, adapter.layout.d_model, tiny_llama.device, tiny_llama.dtype)
    ids = torch.randint(0, adapter.layout.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    graph = hap.Graph.from_model(tiny_llama)
    logits = run_masked(tiny_llama, graph, ids, zero_reference(tiny_llama, graph, 7), torch.ones(graph.real.shape))
    with torch.no_grad():
        expected = tiny_llama.hf_model(ids).logits
    assert torch.allclose(logits, expected, atol=1e-4)


def test_probed_copies_of_one_input_give_each_reader_its_own_gradient(monkeypatch):
    # Attribution's plain run: n readers read one residual, each with a zero probe; the copies are a stride-0
    # expansion (hap.probes), normed and projected once. Twin: the copies materialised (x + probe).
    monkeypatch.setattr("hap.models.normed.FUSED_DTYPES", (torch.float64,))
    generator = torch.Generator().manual_seed(2)
    norm = _norm("llama")
    weight = torch.randn(WIDTH, HEADS, HEAD_WIDTH, generator=generator, dtype=torch.float64)
    x = torch.randn(1, 2, 5, WIDTH, generator=generator, dtype=torch.float64)
    upstream = torch.randn(2, HEADS, 5, HEAD_WIDTH, generator=generator, dtype=torch.float64)
    parameters = rms_parameters(norm, WIDTH, x.device, x.dtype)
    grads = []
    for shared in (True, False):
        probes = ReaderProbes(torch.device("cpu"))
        base = x.clone().requires_grad_(True)
        read = probes.read(base, torch.arange(HEADS)) if shared else base + probes.read(x * 0, torch.arange(HEADS))
        assert (read.stride(0) == 0) == shared
        (rms_normed_projection(read, *parameters, weight, None) * upstream).sum().backward()
        grads.append((base.grad, probes.probes[-1].tensor.grad))
    (fast_input, fast_probe), (slow_input, slow_probe) = grads
    assert float(slow_probe.abs().max()) > 1e-3 and not torch.allclose(slow_probe[0], slow_probe[1])
    assert torch.allclose(fast_probe, slow_probe, atol=1e-12) and torch.allclose(fast_input, slow_input, atol=1e-12)
