"""A model spread over several devices: blocks run where their weights are, bookkeeping stays home.

CPU-only machines have one real device, so the device logic is checked under PyTorch's fake tensors,
where the last layer and the unembedding sit on a second device ("meta") and any op that mixes devices
raises, exactly as it would between two GPUs; the numbers are checked on real tensors with every block
going through the placement wrapper.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

import hap
from hap.ablation import ComputePlan, interchange_reference, run_masked
from hap.errors import DeviceNotAvailableError
from hap.models.loading import Model, adapter_for
from hap.models.placement import PlacedAdapter, placed
from hap.probes import run_with_probes
from hap.tasks import load_task


def _split(model: hap.Model) -> None:
    """Layer 2, the final norm and the unembedding onto the second device."""
    hf = model.hf_model
    for module in (hf.model.layers[2], hf.model.norm, hf.lm_head):
        module.to("meta")


def test_every_block_follows_its_layer_and_results_come_home():
    model = hap.load_model("tiny-llama", device="cpu", seed=3)
    graph = hap.Graph.from_model(model)
    clean, corrupted = torch.randint(4, 100, (2, 6)), torch.randint(4, 100, (2, 6))
    with FakeTensorMode(allow_non_fake_inputs=True):
        _split(model)
        spread = Model("spread", model.hf_model, model.tokenizer, adapter_for(model.hf_model, "x"), "built-in")
        with pytest.raises(FakeTensorDeviceMismatchError):  # without the placement, layer 2 mixes devices
            interchange_reference(spread, corrupted)
        spread.adapter = placed(spread.adapter, torch.device("cpu"))
        assert isinstance(spread.adapter, PlacedAdapter)
        devices = [device.type for device in spread.adapter.block_devices()]
        assert devices == ["cpu"] * 5 + ["meta"] * 3  # embedding, attention/MLP 0 and 1 | 2, unembedding
        reference = interchange_reference(spread, corrupted)
        assert reference.outputs.device.type == "cpu" and reference.block_inputs.device.type == "cpu"
        logits, probes, _ = run_with_probes(spread, graph, clean, reference)  # attribution's pass
        assert logits.device.type == "cpu"
        logits.sum().backward()
        assert all(probe.tensor.grad.device.type == "cpu" for probe in probes)
        adapter, ctx = spread.adapter, spread.adapter.prepare(clean)
        x = torch.zeros(2, 2, 6, 64)  # the masked run's calls: a subset of heads / groups, one input each
        heads, groups = torch.tensor([1, 3]), torch.tensor([0, 1])
        q, k, v = (adapter.queries(2, x, ctx, heads), adapter.keys(2, x, ctx, groups),
                   adapter.values(2, x, ctx, groups))
        mixed = adapter.attend(2, q, k, v, ctx)
        assert adapter.head_outputs(2, mixed, heads).device.type == "cpu"
        assert adapter.mlp(2, x[0]).device.type == "cpu" and adapter.unembed(x[0]).device.type == "cpu"


def test_the_placement_wrapper_computes_what_the_model_computes():
    model = hap.load_model("tiny-llama", device="cpu", dtype="float64")
    wrapped = Model(model.name, model.hf_model, model.tokenizer, PlacedAdapter(model.adapter, model.device),
                    model.origin)
    graph = hap.Graph.from_model(model)
    task = load_task("ioi", model.tokenizer, 4, seed=1)
    reference = interchange_reference(model, task.corrupted_ids)
    assert torch.equal(interchange_reference(wrapped, task.corrupted_ids).outputs, reference.outputs)
    mask = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    live = (mask > 0.6) & graph.real
    plan = ComputePlan.build(graph, live, reference.kind)
    for chosen in (None, plan):
        assert torch.equal(run_masked(wrapped, graph, task.clean_ids, reference, mask, chosen),
                           run_masked(model, graph, task.clean_ids, reference, mask, chosen))
    scores = [hap.attribute(m, task, method="eap-ig-inputs").values for m in (model, wrapped)]
    assert torch.equal(scores[0], scores[1])
    assert isinstance(wrapped.adapter.ungrouped(), PlacedAdapter)


def test_device_maps_load_and_bad_ones_are_refused(tmp_path):
    by_module = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                 "lm_head": "cpu"}
    plain = hap.load_model("tiny-llama", device="cpu")
    for device_map in ("auto", by_module):
        model = hap.load_model("tiny-llama", device_map=device_map)
        assert model.device.type == "cpu"  # one device here: no wrapper needed
        ids = torch.randint(4, 100, (1, 5))
        assert torch.allclose(model.hf_model(ids).logits, plain.hf_model(ids).logits)
    (tmp_path / "map.json").write_text(json.dumps(by_module))
    assert hap.load_model("tiny-llama", device_map=str(tmp_path / "map.json")).device.type == "cpu"
    with pytest.raises(DeviceNotAvailableError, match="auto, balanced or a JSON file"):
        hap.load_model("tiny-llama", device_map="everywhere")
    with pytest.raises(DeviceNotAvailableError, match="disk"):
        hap.load_model("tiny-llama", device_map={"": "disk"})
    with pytest.raises(DeviceNotAvailableError, match="CUDA"):
        hap.load_model("tiny-llama", device_map={"": "cuda:0"})


def test_discover_with_a_device_map(tmp_path):
    from hap.cli import main

    out = tmp_path / "run"
    assert main(["discover", "--model", "tiny-llama", "--allow-weak-model", "--device-map", "auto", "--edges", "20", "--n-examples", "4",
                 "--n-test", "4", "--out", str(out), "--no-report"]) == 0
    assert json.loads((out / "run.json").read_text())["device_map"] == "auto"


def test_half_precision_weights_compute_in_bf16_and_keep_the_sums_in_float32(tmp_path):
    """bf16 weights: blocks in bf16, deltas / references / masked sums in float32, closer to exact arithmetic
    on the same (rounded) weights than running the bookkeeping in bf16 too."""
    import copy

    from hap.cli import main

    model = hap.load_model("tiny-llama", device="cpu", dtype="bfloat16")
    assert model.weights_dtype == torch.bfloat16 and model.dtype == torch.float32
    graph = hap.Graph.from_model(model)
    task = load_task("ioi", model.tokenizer, 8, seed=1)
    exact_hf = copy.deepcopy(model.hf_model).to(torch.float64)  # the same rounded weights, exact arithmetic
    exact = Model("exact", exact_hf, model.tokenizer, adapter_for(exact_hf, "exact"), "built-in")
    all_bf16 = Model("bf16", model.hf_model, model.tokenizer, adapter_for(model.hf_model, "bf16"), "built-in")
    mask = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, candidate in (("exact", exact), ("float32 sums", model), ("bf16 sums", all_bf16)):
        reference = interchange_reference(candidate, task.corrupted_ids)
        assert reference.outputs.dtype == candidate.dtype
        logits[name] = run_masked(candidate, graph, task.clean_ids, reference, mask.to(candidate.dtype)).double()
    error = {name: float((logits[name] - logits["exact"]).abs().mean()) for name in ("float32 sums", "bf16 sums")}
    assert 0 < error["float32 sums"] < error["bf16 sums"], error
    out = tmp_path / "run"
    assert main(["discover", "--model", "tiny-llama", "--allow-weak-model", "--dtype", "bfloat16", "--method", "hap", "--edges", "30",
                 "--steps", "10", "--n-examples", "4", "--n-test", "4", "--out", str(out), "--no-report"]) == 0
