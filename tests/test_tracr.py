"""tracr models: the torch forward equals tracr's, verify is exact, and the ground truth is right (on the
CPU, where the tests make their inputs, whatever device is present)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from naive import naive_masked_logits

import hap
from hap.ablation import interchange_reference, run_masked, zero_reference
from hap.errors import DataError, ModelNotFoundError
from hap.ground_truth import read_ground_truth, recovery, roc_curve
from hap.models import BUILT_IN_MODELS
from hap.models.tracr import (
    PROGRAMS_DIR,
    TracrConfig,
    TracrTransformer,
    sample_inputs,
    shipped_programs,
    true_edges,
)
from hap.verify import verify_model

PROGRAMS = sorted(["frac_prevs", "hist", "reverse", "sort", "xproportion", "shift_by", "pair_balance", "count", "count_less_freq",
                   "detect_pattern", "sort_freq", "shuffle_dyck", "shuffle_dyck2", "sort_reversed"])


def test_the_shipped_programs_ship():
    assert shipped_programs() == PROGRAMS
    assert {f"tracr-{name}" for name in PROGRAMS} <= set(BUILT_IN_MODELS)


@pytest.mark.parametrize("program", PROGRAMS)
def test_torch_forward_gives_tracrs_outputs_padded_in_a_batch(program):
    """examples.json holds what tracr's own compiled model answered; one padded batch must agree."""
    model = hap.load_model(f"tracr-{program}", device="cpu")
    config = model.hf_model.config
    rows = json.loads((PROGRAMS_DIR / program / "examples.json").read_text())
    width = 1 + config.max_seq_len
    ids = torch.full((len(rows), width), config.input_vocab.index(config.pad))
    for i, row in enumerate(rows):
        ids[i, : 1 + len(row["input"])] = torch.tensor([config.input_vocab.index(t) for t in [config.bos, *row["input"]]])
    with torch.no_grad():
        logits = model.hf_model(ids).logits
    for i, row in enumerate(rows):
        for position, expected in enumerate(row["output"], start=1):
            if expected is None:
                continue
            if config.numerical:
                assert float(logits[i, position, 0]) == pytest.approx(expected, abs=1e-3)
            else:
                assert config.output_vocab[int(logits[i, position].argmax())] == expected


@pytest.mark.parametrize("program", PROGRAMS)
def test_verify_is_exact(program):
    report = verify_model(hap.load_model(f"tracr-{program}", device="cpu"))
    assert report["passed"] and report["family"] == "tracr" and report["prompts"] == "program-inputs"
    assert max(v for k, v in report.items() if k.endswith("max_abs_diff")) < 1e-5


@pytest.mark.parametrize("program", PROGRAMS)
def test_ground_truth_from_weights_equals_the_compilers_labels(program):
    """The compile script derives the circuit from tracr's parameter arrays; the loader from the loaded
    torch model: agreement checks the export and loading (transposes, head slices)."""
    model = hap.load_model(f"tracr-{program}", device="cpu")
    shipped = json.loads((PROGRAMS_DIR / program / "ground_truth.json").read_text())["edges"]
    assert true_edges(model.hf_model) == set(shipped)
    graph = hap.Graph.from_model(model)
    for edge in shipped:  # every true edge is an edge of hap's graph
        source, reader = edge.split("->")
        assert graph.real[graph.source_names.index(source), graph.reader_names.index(reader)]


def _hand_model() -> TracrTransformer:
    """One layer, two heads, residual dims [tok, pos, h0_out, mlp_out, one]: listable by hand.

    The embedding writes tok, pos and one; head 0 queries pos, keys tok, values tok and writes
    h0_out; head 1 is all zero (an unused head); the MLP reads h0_out and one and writes mlp_out;
    the unembedding reads mlp_out.
    """
    config = TracrConfig(program="hand", n_layers=1, n_heads=2, d_model=5, head_dim=1, mlp_width=1, causal=False,
                         max_seq_len=3, bos="BOS", pad="PAD", input_vocab=["BOS", "PAD", "a", "b"],
                         output_vocab=["x", "y"], output_label="out", residual_labels=["tok", "pos", "h0", "m", "one"])
    model = TracrTransformer(config)
    for parameter in model.parameters():
        parameter.data.zero_()
    model.token_embed.weight.data[:, 0] = torch.tensor([0.0, 0.0, 1.0, 2.0])
    model.token_embed.weight.data[:, 4] = 1.0
    model.pos_embed.weight.data[1:, 1] = torch.tensor([1.0, 2.0, 3.0])
    layer = model.layers[0]
    layer.q.weight.data[0, 1] = 1.0  # head 0 = row 0 of the [H*K, D] projections
    layer.k.weight.data[0, 0] = 1.0
    layer.v.weight.data[0, 0] = 1.0
    layer.o.weight.data[2, 0] = 1.0
    layer.mlp_in.weight.data[0, 2] = 1.0
    layer.mlp_in.weight.data[0, 4] = -0.5
    layer.mlp_out.weight.data[3, 0] = 1.0
    model.unembed.weight.data[0, 3] = 1.0
    model.unembed.weight.data[1, 3] = -1.0
    return model


def test_ground_truth_on_a_program_listed_by_hand():
    assert true_edges(_hand_model()) == {
        "input->a0.h0<q>", "input->a0.h0<k>", "input->a0.h0<v>",  # pos, tok, tok
        "input->m0",  # the `one` direction: the MLP's bias
        "a0.h0->m0",
        "m0->logits",
    }  # not a0.h1 (zero), not input->logits (no overlap), not a0.h0->logits


@pytest.mark.parametrize("program", ["reverse", "sort"])
@pytest.mark.parametrize("kind", ["interchange", "zero"])
def test_masked_run_with_padding_matches_the_slow_twin(program, kind):
    model = hap.load_model(f"tracr-{program}", device="cpu")
    config = model.hf_model.config
    graph = hap.Graph.from_model(model)
    generator = torch.Generator().manual_seed(4)
    lengths = torch.tensor([1, 3, 5, 2])
    clean, corrupted = sample_inputs(config, lengths, generator), sample_inputs(config, lengths, generator)
    assert (clean == config.input_vocab.index(config.pad)).any()  # the batch really is padded
    reference = (interchange_reference(model, corrupted) if kind == "interchange"
                 else zero_reference(model, graph, clean.shape[1]))
    mask = torch.rand(graph.real.shape, generator=generator)
    with torch.no_grad():
        fast = run_masked(model, graph, clean, reference, mask)
        slow = naive_masked_logits(model, graph, clean, reference.outputs, mask)
    assert torch.allclose(fast, slow, atol=1e-4)


def test_a_broken_tracr_directory_is_refused_with_the_fix(tmp_path):
    folder = tmp_path / "reverse"
    shutil.copytree(PROGRAMS_DIR / "reverse", folder)
    config = json.loads((folder / "config.json").read_text())
    del config["head_dim"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError, match="missing head_dim.*compile_tracr"):
        hap.load_model(str(folder))
    config["head_dim"] = 3  # the wrong shape for the weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError, match="wrong shape.*compile_tracr"):
        hap.load_model(str(folder))


def test_a_copied_directory_loads_like_the_shipped_name(tmp_path):
    folder = Path(shutil.copytree(PROGRAMS_DIR / "hist", tmp_path / "hist"))
    copy, shipped = hap.load_model(str(folder), device="cpu"), hap.load_model("tracr-hist", device="cpu")
    ids = sample_inputs(copy.hf_model.config, torch.tensor([2, 4]), torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy.hf_model(ids).logits, shipped.hf_model(ids).logits)
    assert copy.origin == "tracr"


def _pairwise_auc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """The slow twin: the share of (true, false) pairs the true edge wins, ties counting half."""
    wins = 0.0
    for t in scores[truth].tolist():
        for f in scores[~truth].tolist():
            wins += 1.0 if t > f else 0.5 if t == f else 0.0
    return wins / (int(truth.sum()) * int((~truth).sum()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_pairwise_counting_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (40,), generator=generator).double()  # many ties
    truth = torch.rand(40, generator=generator) < 0.3
    fpr, tpr, auc = roc_curve(scores, truth)
    assert auc == pytest.approx(_pairwise_auc(scores, truth), abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert all(a <= b for a, b in zip(fpr, fpr[1:])) and all(a <= b for a, b in zip(tpr, tpr[1:]))


@pytest.mark.parametrize("n_true, n_false", [(1, 21), (5, 18), (7, 39)])
def test_a_perfect_ranking_has_an_auc_of_exactly_one(n_true, n_false):
    """Summed as fractions, the trapezoids of a perfect ranking can miss 1.0 by a rounding (1 - 1e-16 for one
    true edge among 21 false ones); in whole counts they do not, so "AUC 1.0" can be tested for equality."""
    scores = torch.cat([100 + torch.arange(n_true, dtype=torch.float64), torch.arange(n_false, dtype=torch.float64)])
    truth = torch.arange(n_true + n_false) < n_true
    assert roc_curve(scores, truth)[2] == 1.0
    assert roc_curve(-scores, truth)[2] == 0.0


def test_recovery_of_the_true_circuit_and_of_a_wrong_one():
    model = hap.load_model("tracr-reverse", device="cpu")
    graph = hap.Graph.from_model(model)
    truth = read_ground_truth(PROGRAMS_DIR / "reverse" / "ground_truth.json", graph)
    perfect = recovery(graph, truth, truth.double() + 0.1 * graph.real, truth)
    assert perfect.exact and perfect.precision == perfect.recall == perfect.auc == 1.0
    one_missed = truth.clone()
    one_missed[truth.nonzero()[0][0], truth.nonzero()[0][1]] = False
    extra = graph.real & ~truth
    wrong_choice = one_missed | (extra & (torch.rand(extra.shape, generator=torch.Generator().manual_seed(0)) < 0.1))
    result = recovery(graph, wrong_choice, -truth.double(), truth)  # |score| ranks the true edges first still
    assert not result.exact and result.recall == pytest.approx((result.n_true - 1) / result.n_true)
    assert result.precision == pytest.approx(result.true_positives / result.n_chosen) and result.precision < 1
    assert result.auc == 1.0
    inverted = recovery(graph, truth, (~truth).double() * graph.real, truth)  # false edges outrank true ones
    assert inverted.auc == 0.0


def test_a_ground_truth_file_of_another_model_is_refused(tmp_path):
    graph = hap.Graph.from_model(hap.load_model("tracr-hist", device="cpu"))  # one layer: no a3
    with pytest.raises(DataError, match="input->m1.*another model"):
        read_ground_truth(PROGRAMS_DIR / "reverse" / "ground_truth.json", graph)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="non-empty list"):
        read_ground_truth(tmp_path / "empty.json", graph)
