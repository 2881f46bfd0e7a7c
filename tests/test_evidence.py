"""Evidence of what each node does, checked against hooks on the Hugging Face model; the named positions
every task gives."""

from __future__ import annotations

import json

import pytest
import torch

import hap
from hap.errors import DataError
from hap.evidence import node_evidence, node_readers
from hap.models.tiny import build_tiny_model
from hap.plain_run import answer_logits
from hap.tasks import custom_task, load_task


def _hooked(model: hap.Model, ids: torch.Tensor):
    """Per layer the input of the attention output projection [B, T, H*K] and the eager attention weights,
    and the final norm's input [B, T, D], read with forward hooks on the Hugging Face modules."""
    hf = model.hf_model
    gpt2 = model.layout.family == "gpt2"
    blocks = hf.transformer.h if gpt2 else hf.model.layers
    projections = [block.attn.c_proj if gpt2 else block.self_attn.o_proj for block in blocks]
    final_norm = hf.transformer.ln_f if gpt2 else hf.model.norm
    mixed, final = [], []
    handles = [projection.register_forward_pre_hook(lambda module, args: mixed.append(args[0]))
               for projection in projections]
    handles.append(final_norm.register_forward_pre_hook(lambda module, args: final.append(args[0])))
    before = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = hf(ids, output_attentions=True).attentions
    finally:
        hf.set_attn_implementation(before)
        for handle in handles:
            handle.remove()
    return mixed, attentions, final[0]


def _head_output(model: hap.Model, layer: int, head: int, mixed: torch.Tensor) -> torch.Tensor:
    """Head ``head``'s share of the layer's output from the projection's input, by the module's weights."""
    hf, width = model.hf_model, model.layout.head_dim
    piece = mixed[..., head * width:(head + 1) * width]
    if model.layout.family == "gpt2":
        projection = hf.transformer.h[layer].attn.c_proj  # Conv1D: weight [in, out]
        return piece @ projection.weight[head * width:(head + 1) * width] + projection.bias / model.layout.n_heads
    projection = hf.model.layers[layer].self_attn.o_proj
    return piece @ projection.weight[:, head * width:(head + 1) * width].T


def _frozen(model: hap.Model, part: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``part`` through the final norm with the scale of ``total``, written out for each norm type."""
    hf = model.hf_model
    if model.layout.family == "gpt2":
        norm = hf.transformer.ln_f
        return (part - part.mean(-1, keepdim=True)) / torch.sqrt(total.var(-1, unbiased=False, keepdim=True)
                                                                 + norm.eps) * norm.weight
    norm = hf.model.norm
    return part / torch.sqrt(total.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_attention_and_direct_effect_equal_hooks_on_the_hugging_face_model(name, tmp_path):
    hf, tokenizer = build_tiny_model(name)
    torch.manual_seed(0)
    with torch.no_grad():  # noisy norms and biases, so a misplaced gain or centring would show
        for parameter in hf.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = hap.load_model(str(tmp_path), device="cpu", dtype="float64")
    task = load_task("ioi", model.tokenizer, 6, seed=3)
    evidence = node_evidence(model, task, batch_size=4)
    ids = task.clean_ids
    mixed, attentions, final = _hooked(model, ids)
    rows = torch.arange(len(task))
    answer = task.answer_positions
    unembed = model.hf_model.lm_head.weight
    direction = unembed[task.answer_ids] - unembed[task.wrong_ids]  # [N, D]: the logit difference's
    named = task.named()
    total = final[rows, answer]
    for layer in range(model.layout.n_layers):
        for head in range(model.layout.n_heads):
            node = evidence.node(f"a{layer}.h{head}")
            output = _head_output(model, layer, head, mixed[layer])[rows, answer]
            expected_direct = (_frozen(model, output, total) * direction).sum(-1).mean()
            # the gain is read through the module, which Llama computes in float32: float32 rounding
            assert node.direct_effect == pytest.approx(float(expected_direct), abs=1e-6)
            weights = attentions[layer][:, head]
            for source in ("END", "S2"):
                for target in ("IO", "S1", "S1+1"):
                    expected = weights[rows, named[source], named[target]].mean()
                    # Hugging Face's eager softmax runs in float32 even in a float64 model
                    assert node.attends(source, target) == pytest.approx(float(expected), abs=1e-6)
            first = weights[0, named["END"][0], :int(task.lengths[0])]
            assert node.example_attention["END"] == pytest.approx(first.tolist(), abs=1e-3)
    with torch.no_grad():
        logits = model.hf_model(ids).logits[rows, answer]
    assert evidence.full_metric == pytest.approx(float(task.logit_diff(logits).mean()), abs=1e-9)


def test_direct_effects_of_all_sources_sum_to_the_metric():
    """RMS norm, no bias anywhere: the frozen-scale shares of every source add up to the normed residual,
    so their direct effects add up to the logit difference itself."""
    model = hap.load_model("tiny-llama", device="cpu", dtype="float64")
    task = load_task("ioi", model.tokenizer, 8, seed=1)
    evidence = node_evidence(model, task, batch_size=3)
    total = evidence.input_direct_effect + sum(node.direct_effect for node in evidence.nodes)
    logits = answer_logits(model, task.clean_ids, task.answer_positions)
    assert total == pytest.approx(float(task.logit_diff(logits).mean()), abs=1e-7)
    assert evidence.full_metric == pytest.approx(float(task.logit_diff(logits).mean()), abs=1e-9)
    assert evidence.positions == ["IO", "S1", "S1+1", "S2", "END"]
    io_token = model.tokenizer.decode([int(task.answer_ids[0])])
    assert evidence.example_tokens[evidence.example_positions["IO"]] == io_token


def test_readers_name_the_kept_inputs_by_kind(tiny_llama):
    graph = hap.Graph.from_model(tiny_llama)
    kept = torch.zeros(graph.real.shape, dtype=torch.bool)
    source = graph.source_index("a0.h1")
    for reader in ("a1.h2<q>", "a2.g1<k>", "a1.g0<v>", "m1", "logits"):
        kept[source, graph.reader_index(reader)] = True
    assert node_readers(graph, kept, source) == {"q": ["a1.h2"], "v": ["a1.g0"], "k": ["a2.g1"], "mlp": ["m1"],
                                                 "logits": ["logits"]}
    assert node_readers(graph, kept, graph.source_index("a0.h0")) == {}


def test_ioi_names_its_positions_with_or_without_bos(tiny_llama):
    for bos in (False, True):
        task = load_task("ioi", tiny_llama.tokenizer, 8, seed=2, bos=bos)
        named = task.named()
        assert list(named) == ["IO", "S1", "S1+1", "S2", "END"]
        for row in range(len(task)):
            ids = task.clean_ids[row]
            assert ids[named["IO"][row]] == task.answer_ids[row]
            assert ids[named["S1"][row]] == ids[named["S2"][row]] == task.wrong_ids[row]
            assert named["S1"][row] < named["S2"][row] and named["S1+1"][row] == named["S1"][row] + 1
            assert named["END"][row] == task.lengths[row] - 1
        first = task.slice(2, 5).named()
        assert torch.equal(first["S2"], named["S2"][2:5])


def test_greater_than_names_the_start_year_and_its_century(tiny_llama):
    task = load_task("greater-than", tiny_llama.tokenizer, 6, seed=0)
    named = task.named()
    assert set(named) == {"YY", "century", "END"}
    for row in range(len(task)):
        words = task.clean_prompts[row].split()
        year = next(i for i, word in enumerate(words) if word.isdigit())
        assert tiny_llama.tokenizer.decode([int(task.clean_ids[row, named["YY"][row]])]) == words[year + 1]
        assert tiny_llama.tokenizer.decode([int(task.clean_ids[row, named["century"][row]])]) == words[year]


def test_a_custom_file_may_name_positions_and_bad_ones_are_refused(tiny_llama, tmp_path):
    tokenizer = tiny_llama.tokenizer
    rows = [{"clean": "When Mary and John went to the store , John gave a book to",
             "corrupted": "When Anna and Kate went to the store , Ruth gave a book to",
             "answer": " Mary", "wrong": " John", "positions": {"IO": 1, "S2": -5}},
            {"clean": "When Tom and Sam went to the store , Sam gave a book to",
             "corrupted": "When Anna and Kate went to the store , Ruth gave a book to",
             "answer": " Tom", "wrong": " Sam"}]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    for bos in (False, True):
        task = custom_task(path, tokenizer, 10, bos=bos)
        named = task.named()
        offset = int(bos)
        assert named["IO"].tolist() == [1 + offset, -1] and named["S2"].tolist() == [9 + offset, -1]
        assert tokenizer.decode([int(task.clean_ids[0, named["S2"][0]])]) == "John"
    for positions, problem in (({"IO": 40}, "whole number from -14 to 13"), ({"END": 1}, "taken"),
                               ([1, 2], "non-empty object"), ({"IO": 1.5}, "whole number")):
        path.write_text(json.dumps({**rows[0], "positions": positions}))
        with pytest.raises(DataError, match=problem):
            custom_task(path, tokenizer, 10)


def test_a_tracr_program_names_every_position():
    task = load_task("tracr-reverse", None, 5)
    named = task.named()
    width = task.clean_ids.shape[1]
    assert list(named)[:width] == [f"p{i}" for i in range(width)]
    for row in range(len(task)):
        present = [label for label in named if label != "END" and named[label][row] >= 0]
        assert len(present) == int(task.lengths[row])
