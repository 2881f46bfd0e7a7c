"""Attribution methods against one-edge-at-a-time patching and their own identities."""

import pytest
import torch
from linear_model import linear_model

import hap
from hap.attribution import AttributionConfig, Method, attribute
from hap.errors import HapError
from hap.tasks import load_task

# Scores are stored in float32: equality with the float64 model's exact scores holds to float32 resolution.
FLOAT32 = 1e-6


@pytest.fixture(scope="module")
def linear():
    return linear_model()


@pytest.mark.parametrize("chunk_layers", [1, 4])  # one score product per layer's probes, or all at once
def test_eap_equals_exact_on_a_linear_model(linear, chunk_layers, monkeypatch):
    monkeypatch.setattr("hap.attribution.SCORE_CHUNK_LAYERS", chunk_layers)
    task = load_task("ioi", linear.tokenizer, 6, seed=1)
    graph = hap.Graph.from_model(linear)
    eap = attribute(linear, task, "eap", AttributionConfig(batch_size=4)).values
    exact = attribute(linear, task, "exact", AttributionConfig(batch_size=4)).values
    assert float(exact.abs().max()) > 1e-3
    assert torch.allclose(eap[graph.real], exact[graph.real], atol=FLOAT32 * float(exact.abs().max()))


def test_eap_differs_from_exact_on_a_nonlinear_model(tiny_llama):
    # The linear test above is not vacuous: on a real architecture the two differ.
    task = load_task("ioi", tiny_llama.tokenizer, 4)
    eap = attribute(tiny_llama, task, "eap").values
    exact = attribute(tiny_llama, task, "exact").values
    assert not torch.allclose(eap, exact, atol=1e-5)
    graph = hap.Graph.from_model(tiny_llama)
    ranks = [x[graph.real].abs().argsort().argsort().float() for x in (eap, exact)]
    assert float(torch.corrcoef(torch.stack(ranks))[0, 1]) > 0.8  # but they agree on what matters


def test_one_activation_step_is_eap(tiny_model):
    task = load_task("ioi", tiny_model.tokenizer, 5, seed=2)
    eap = attribute(tiny_model, task, "eap").values
    one_step = attribute(tiny_model, task, "eap-ig-activations", AttributionConfig(ig_steps=1)).values
    assert torch.allclose(eap, one_step, atol=1e-6)
    five = attribute(tiny_model, task, "eap-ig-activations", AttributionConfig(ig_steps=5)).values
    assert not torch.allclose(eap, five, atol=1e-4)


@pytest.mark.parametrize("method", ["eap-ig-inputs", "eap-ig-activations"])
def test_integrated_gradients_equal_exact_on_a_linear_model(linear, method):
    task = load_task("ioi", linear.tokenizer, 4, seed=6)
    exact = attribute(linear, task, "exact").values
    ig = attribute(linear, task, method, AttributionConfig(ig_steps=3)).values
    assert torch.allclose(ig, exact, atol=FLOAT32 * float(exact.abs().max()))


def test_input_integrated_gradients_converge_with_steps(tiny_llama):
    task = load_task("ioi", tiny_llama.tokenizer, 4, seed=3)
    runs = {m: attribute(tiny_llama, task, "eap-ig-inputs", AttributionConfig(ig_steps=m)).values for m in (1, 8, 32)}
    far, near = ((runs[m] - runs[32]).abs().sum() for m in (1, 8))
    assert float(near) < 0.5 * float(far)


def test_exact_on_a_subset_scores_only_those_edges(tiny_gpt2):
    task = load_task("ioi", tiny_gpt2.tokenizer, 4)
    subset = ("a1.h2->logits", "a1.h2->m2")
    scores = attribute(tiny_gpt2, task, "exact", AttributionConfig(edges_subset=subset)).values
    graph = hap.Graph.from_model(tiny_gpt2)
    assert int((scores != 0).sum()) == 2
    full = attribute(tiny_gpt2, task, "exact").values
    for name in subset:
        assert float(scores[graph.edge_index(name)]) == pytest.approx(float(full[graph.edge_index(name)]))


def test_kl_loss_ranks_edges_and_eap_refuses_it(tiny_llama):
    task = load_task("ioi", tiny_llama.tokenizer, 4)
    scores = attribute(tiny_llama, task, "eap-ig-inputs", AttributionConfig(loss="kl")).values
    assert float(scores.abs().sum()) > 0
    with pytest.raises(HapError, match="zero gradient"):
        AttributionConfig(method=Method.EAP, loss="kl")


def test_scores_are_the_mean_over_batches(tiny_gpt2):
    task = load_task("ioi", tiny_gpt2.tokenizer, 6, seed=4)
    whole = attribute(tiny_gpt2, task, "eap", AttributionConfig(batch_size=6)).values
    split = attribute(tiny_gpt2, task, "eap", AttributionConfig(batch_size=4)).values
    assert torch.allclose(whole, split, atol=1e-6)


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_other_ablations_match_exact_on_a_linear_model(linear, kind):
    task = load_task("ioi", linear.tokenizer, 4, seed=5)
    config = AttributionConfig(ablation=kind)
    eap = attribute(linear, task, "eap", config).values
    exact = attribute(linear, task, "exact", config).values
    assert torch.allclose(eap, exact, atol=FLOAT32 * float(exact.abs().max()))
