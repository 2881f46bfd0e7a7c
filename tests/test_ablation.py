"""The ablation primitive against the Hugging Face forward and against its slow twin."""

import pytest
import torch
from naive import naive_masked_logits

import hap
from hap.ablation import (AblationKind, ComputePlan, MaskedRun, interchange_reference, mean_reference, run_masked,
                          trace, zero_reference)
from hap.errors import InvalidMaskError
from hap.known_outputs import record_outputs
from hap.models.tiny_vocab import SPECIAL_TOKENS


def _batch(model: hap.Model, seed: int, batch: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    # Ordinary tokens only: a special token such as [PAD] has an all-zero embedding in the tiny models, and
    # a norm of an all-zero residual turns float32 rounding into large differences (real prompts never
    # start with padding).
    generator = torch.Generator().manual_seed(seed)
    low, vocab = len(SPECIAL_TOKENS), model.layout.vocab_size
    return (torch.randint(low, vocab, (batch, length), generator=generator),
            torch.randint(low, vocab, (batch, length), generator=generator))


def test_adapter_reproduces_hugging_face(tiny_model):
    clean, _ = _batch(tiny_model, 0)
    with torch.no_grad():
        expected = tiny_model.hf_model(clean).logits
        recorded = trace(tiny_model, clean)
    assert torch.allclose(recorded.logits, expected, atol=1e-5)
    # The residual entering each block is the sum of the sources before it.
    graph = hap.Graph.from_model(tiny_model)
    for block in range(1, graph.n_blocks):
        upstream = recorded.outputs[graph.source_block < block].sum(0)
        assert torch.allclose(recorded.block_inputs[block], upstream, atol=1e-5)


def test_all_on_is_clean_and_all_off_is_corrupted(tiny_model):
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 1)
    reference = interchange_reference(tiny_model, corrupted)
    with torch.no_grad():
        on = run_masked(tiny_model, graph, clean, reference, torch.ones(graph.real.shape))
        off = run_masked(tiny_model, graph, clean, reference, torch.zeros(graph.real.shape))
        assert torch.allclose(on, tiny_model.hf_model(clean).logits, atol=1e-5)
        assert torch.allclose(off, tiny_model.hf_model(corrupted).logits, atol=1e-5)
        assert not torch.allclose(on, off, atol=1e-3)  # the test can tell the two apart


@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"chunk{n}")
def chunk_layers(request, monkeypatch):
    """Run a test with reader sums chunked by 1, 2 and 4 layers (the tiny models have 3)."""
    monkeypatch.setattr("hap.ablation.CHUNK_LAYERS", request.param)
    return request.param


@pytest.fixture(params=[0, 10**9], ids=["gather", "every-row"])
def gather_cost(request, monkeypatch):
    """Run a test with the masked sums over the gathered used rows of the delta buffer only (0), and over
    every row with the unused ones at mask 0 (a cost no gather beats)."""
    monkeypatch.setattr("hap.ablation.GATHER_COST", request.param)
    return request.param


@pytest.mark.parametrize("kind", list(AblationKind))
def test_fractional_mask_matches_the_slow_twin(tiny_model, kind, chunk_layers):
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 2)
    if kind is AblationKind.INTERCHANGE:
        reference = interchange_reference(tiny_model, corrupted)
    elif kind is AblationKind.MEAN:
        reference = mean_reference(tiny_model, graph, torch.cat([corrupted, clean]).roll(1, 1))
    else:
        reference = zero_reference(tiny_model, graph, clean.shape[1])
    mask = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = run_masked(tiny_model, graph, clean, reference, mask)
        slow = naive_masked_logits(tiny_model, graph, clean, reference.outputs, mask)
    assert torch.allclose(fast, slow, atol=1e-5)


def test_per_example_masks_match_the_slow_twin(tiny_model, chunk_layers):
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 4)
    reference = interchange_reference(tiny_model, corrupted)
    masks = torch.rand((clean.shape[0], *graph.real.shape), generator=torch.Generator().manual_seed(5))
    masks[1] = 1.0  # a row that must come out exactly clean
    with torch.no_grad():
        fast = run_masked(tiny_model, graph, clean, reference, masks)
        slow = naive_masked_logits(tiny_model, graph, clean, reference.outputs, masks)
        assert torch.allclose(fast, slow, atol=1e-5)
        assert torch.allclose(fast[1], tiny_model.hf_model(clean[1:2]).logits[0], atol=1e-5)


@pytest.mark.parametrize("share_of_ones", [0.5, 0.95])
def test_masks_mostly_at_one_match_the_slow_twin(tiny_model, chunk_layers, share_of_ones):
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 23)
    reference = interchange_reference(tiny_model, corrupted)
    generator = torch.Generator().manual_seed(24)
    mask = torch.rand(graph.real.shape, generator=generator)
    mask[torch.rand(graph.real.shape, generator=generator) < share_of_ones] = 1.0
    masks = mask.expand(clean.shape[0], -1, -1).clone()
    masks[(0, *graph.edge_index("input->logits"))] = 0.3  # per example, too
    with torch.no_grad():
        for m in (mask, masks):
            fast = run_masked(tiny_model, graph, clean, reference, m)
            slow = naive_masked_logits(tiny_model, graph, clean, reference.outputs, m)
            assert torch.allclose(fast, slow, atol=1e-5)


def test_sparse_plans_with_per_example_masks_match_the_slow_twin(tiny_model, chunk_layers, gather_cost):
    # A sparse live set: the sums run over a subset of buffer rows and readers, per example.
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 21)
    reference = interchange_reference(tiny_model, corrupted)
    generator = torch.Generator().manual_seed(22)
    live = (torch.rand(graph.real.shape, generator=generator) < 0.15) & graph.real
    masks = torch.rand((clean.shape[0], *graph.real.shape), generator=generator).requires_grad_(True)
    plan = ComputePlan.build(graph, live, AblationKind.INTERCHANGE)
    fast = run_masked(tiny_model, graph, clean, reference, masks, plan=plan)
    slow = naive_masked_logits(tiny_model, graph, clean, reference.outputs, masks.detach() * live)
    assert torch.allclose(fast, slow, atol=1e-5)
    fast.square().mean().backward()
    assert float(masks.grad[:, ~live].abs().sum()) == 0.0 and float(masks.grad[:, live].abs().sum()) > 0.0


@pytest.mark.parametrize("kind", list(AblationKind))
def test_known_early_outputs_give_the_slow_twins_logits(tiny_model, chunk_layers, kind):
    # Copies of a batch whose masks agree on the readers before block b and differ from b on: the early
    # blocks' recorded outputs, taken as given, give the same logits as computing everything.
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 31)
    copies, size = 3, clean.shape[0]

    def reference_of(n_copies):
        if kind is AblationKind.INTERCHANGE:
            return interchange_reference(tiny_model, corrupted.repeat(n_copies, 1))
        if kind is AblationKind.MEAN:
            return mean_reference(tiny_model, graph, torch.cat([corrupted, clean]).roll(1, 1))
        return zero_reference(tiny_model, graph, clean.shape[1])

    one, repeated = reference_of(1), reference_of(copies)
    generator = torch.Generator().manual_seed(32)
    live = (torch.rand(graph.real.shape, generator=generator) < 0.6) & graph.real
    plan = ComputePlan.build(graph, live, kind)
    shared = torch.rand(graph.real.shape, generator=generator)
    for block in (1, 4, graph.n_blocks - 1):
        later = graph.reader_block >= block
        masks = shared.expand(copies, -1, -1).clone()
        masks[:, :, later] = torch.rand((copies, graph.n_sources, int(later.sum())), generator=generator)
        masks = masks.repeat_interleave(size, dim=0)  # copy i on rows i*B .. (i+1)*B
        known = record_outputs(tiny_model, graph, clean, one, shared, block, plan)
        with torch.no_grad():
            fast = run_masked(tiny_model, graph, clean.repeat(copies, 1), one.of_copies(copies), masks, plan=plan,
                              known=known)
            slow = naive_masked_logits(tiny_model, graph, clean.repeat(copies, 1), repeated.outputs, masks * live)
        assert torch.allclose(fast, slow, atol=1e-5), block
        if block > 1:  # the given outputs are used: recorded under other early masks, they change the logits
            other = record_outputs(tiny_model, graph, clean, one, torch.rand(graph.real.shape, generator=generator),
                                   block, plan)
            with torch.no_grad():
                wrong = run_masked(tiny_model, graph, clean.repeat(copies, 1), one.of_copies(copies), masks,
                                   plan=plan, known=other)
            assert not torch.allclose(wrong, slow, atol=1e-3), block


def test_a_reference_of_copies_reads_like_the_repeated_reference(tiny_model):
    # Copies of a batch under one reference of the batch (nothing repeated) give the logits of the
    # reference repeated; a reference for another number of copies is refused.
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 34)
    copies = 2
    masks = torch.rand((copies * clean.shape[0], *graph.real.shape), generator=torch.Generator().manual_seed(35))
    with torch.no_grad():
        shared = run_masked(tiny_model, graph, clean.repeat(copies, 1),
                            interchange_reference(tiny_model, corrupted).of_copies(copies), masks)
        repeated = run_masked(tiny_model, graph, clean.repeat(copies, 1),
                              interchange_reference(tiny_model, corrupted.repeat(copies, 1)), masks)
    assert torch.allclose(shared, repeated, atol=1e-6)
    with pytest.raises(InvalidMaskError, match=r"3 examples \(3 copies of it\) but the run has 6"):
        run_masked(tiny_model, graph, clean.repeat(copies, 1), interchange_reference(tiny_model, corrupted).of_copies(3),
                   masks)


def test_known_outputs_of_another_batch_are_refused(tiny_model):
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 33)
    reference = zero_reference(tiny_model, graph, clean.shape[1])
    known = record_outputs(tiny_model, graph, clean, reference, torch.ones(graph.real.shape), 3)
    with pytest.raises(InvalidMaskError, match="recorded on 3 x 7 tokens"):
        run_masked(tiny_model, graph, clean[:2], reference, torch.ones(graph.real.shape), known=known)


def test_one_edge_ablated_changes_only_through_that_edge(tiny_llama):
    graph = hap.Graph.from_model(tiny_llama)
    clean, corrupted = _batch(tiny_llama, 6)
    reference = interchange_reference(tiny_llama, corrupted)
    mask = torch.ones(graph.real.shape)
    mask[graph.edge_index("input->logits")] = 0.0
    with torch.no_grad():
        fast = run_masked(tiny_llama, graph, clean, reference, mask)
        clean_run = trace(tiny_llama, clean)
        corrupted_run = trace(tiny_llama, corrupted)
    # Only the direct path changes: logits read clean residual minus the clean embedding plus the corrupted one.
    final = clean_run.block_inputs[-1] - clean_run.outputs[0] + corrupted_run.outputs[0]
    assert torch.allclose(fast, tiny_llama.adapter.unembed(final), atol=1e-5)


def test_answer_positions_give_the_same_logits(tiny_model):
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 7)
    reference = interchange_reference(tiny_model, corrupted)
    mask = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(8))
    positions = torch.tensor([6, 2, 0])
    with torch.no_grad():
        full = run_masked(tiny_model, graph, clean, reference, mask)
        picked = run_masked(tiny_model, graph, clean, reference, mask, positions=positions)
    assert picked.shape == (3, tiny_model.layout.vocab_size)
    assert torch.allclose(picked, full[torch.arange(3), positions], atol=1e-6)


@pytest.mark.parametrize("share_of_ones", [0.0, 0.9])
def test_mask_gradient_matches_finite_differences(tiny_gpt2_64, chunk_layers, share_of_ones, gather_cost):
    # GPT-2's LayerNorm is truly float64 (HF's Llama RMSNorm computes in float32), so a
    # central difference is exact to ~1e-9 here; the masking code is the same for every family.
    # Masks mostly at exactly 1 take the complement form of the sums (all deltas minus the (1 - m) share).
    model = tiny_gpt2_64
    graph = hap.Graph.from_model(model)
    clean, corrupted = _batch(model, 9)
    reference = interchange_reference(model, corrupted)
    generator = torch.Generator().manual_seed(10)
    base = (0.2 + 0.6 * torch.rand(graph.real.shape, generator=generator)).double()
    ones = torch.rand(graph.real.shape, generator=generator) < share_of_ones
    base = torch.where(ones, torch.ones_like(base), base)
    base[graph.edge_index("a0.h1->a1.h0<q>")] = 1.0  # an entry at exactly 1 whose gradient is checked

    def logit_diff(mask: torch.Tensor) -> torch.Tensor:
        logits = run_masked(model, graph, clean, reference, mask, positions=torch.full((3,), 6))
        return (logits[:, 5] - logits[:, 7]).mean()

    mask = base.clone().requires_grad_(True)
    logit_diff(mask).backward()
    edges = ["input->logits", "a0.h1->a1.h0<q>", "a0.h3->a2.h1<k>", "m0->a1.h0<v>", "a2.h2->m2", "m1->logits"]
    for name in edges:
        index = graph.edge_index(name)
        step = 1e-5
        up, down = base.clone(), base.clone()
        up[index] += step
        down[index] -= step
        with torch.no_grad():
            numeric = (logit_diff(up) - logit_diff(down)) / (2 * step)
        assert float(numeric) == pytest.approx(float(mask.grad[index]), rel=1e-6, abs=1e-10), name
    assert float(mask.grad[graph.edge_index("m1->logits")]) != 0.0
    assert float(mask.grad[~graph.real].abs().sum()) == 0.0


@pytest.mark.parametrize("kind", [AblationKind.INTERCHANGE, AblationKind.MEAN])
def test_skipping_gives_the_same_logits_and_gradients(tiny_model, kind, chunk_layers, gather_cost):
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 11)
    if kind is AblationKind.INTERCHANGE:
        reference = interchange_reference(tiny_model, corrupted)
    else:
        reference = mean_reference(tiny_model, graph, corrupted)
    generator = torch.Generator().manual_seed(12)
    live = (torch.rand(graph.real.shape, generator=generator) < 0.08) & graph.real
    live[graph.edge_index("input->a0.h0<q>")] = True
    live[graph.edge_index("a0.h0->logits")] = True  # a live path to the output
    values = torch.rand(graph.real.shape, generator=generator) * live
    plan = ComputePlan.build(graph, live, reference.kind)
    if kind is AblationKind.INTERCHANGE:
        assert int(plan.active.sum()) < graph.n_sources  # something really is skipped
        assert int(plan.formed.sum()) < graph.n_readers

    skipped_mask = values.clone().requires_grad_(True)
    full_mask = values.clone().requires_grad_(True)
    skipped = run_masked(tiny_model, graph, clean, reference, skipped_mask, plan=plan)
    full = run_masked(tiny_model, graph, clean, reference, full_mask)
    assert torch.allclose(skipped, full, atol=1e-5)
    skipped.square().mean().backward()
    full.square().mean().backward()
    assert torch.allclose(skipped_mask.grad[live], full_mask.grad[live], atol=1e-6)
    assert float(skipped_mask.grad[~live].abs().sum()) == 0.0
    # The full run's gradients off the live set are not zero: the comparison is not vacuous.
    assert float(full_mask.grad[graph.real & ~live].abs().sum()) > 0.0


def test_plan_marks_untouched_heads_inactive(tiny_llama):
    graph = hap.Graph.from_model(tiny_llama)
    live = torch.zeros(graph.real.shape, dtype=torch.bool)
    live[graph.edge_index("input->a1.h2<q>")] = True
    live[graph.edge_index("a1.h2->logits")] = True
    plan = ComputePlan.build(graph, live, AblationKind.INTERCHANGE)
    active = [graph.source_names[i] for i in plan.active.nonzero().flatten().tolist()]
    assert active == ["input", "a1.h2"]
    formed = [graph.reader_names[i] for i in plan.formed.nonzero().flatten().tolist()]
    assert formed == ["a1.h2<q>", "logits"]
    # Under mean ablation every source writes something other than its mean, so more is formed.
    mean_plan = ComputePlan.build(graph, live, AblationKind.MEAN)
    assert bool(mean_plan.contributing.all())


def test_bad_masks_and_references_are_refused(tiny_llama):
    graph = hap.Graph.from_model(tiny_llama)
    clean, corrupted = _batch(tiny_llama, 13)
    reference = interchange_reference(tiny_llama, corrupted)
    with pytest.raises(InvalidMaskError, match="shape"):
        run_masked(tiny_llama, graph, clean, reference, torch.ones(3, 3))
    with pytest.raises(InvalidMaskError, match="rows"):
        run_masked(tiny_llama, graph, clean, reference, torch.ones(2, *graph.real.shape))
    with pytest.raises(InvalidMaskError, match="batch"):
        run_masked(tiny_llama, graph, clean[:2], reference, torch.ones(graph.real.shape))


def test_edges_off_the_live_set_are_ablated_whatever_the_mask_says(tiny_gpt2):
    graph = hap.Graph.from_model(tiny_gpt2)
    clean, corrupted = _batch(tiny_gpt2, 14)
    reference = interchange_reference(tiny_gpt2, corrupted)
    live = (torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(15)) < 0.3) & graph.real
    plan = ComputePlan.build(graph, live, reference.kind)
    with torch.no_grad():
        ones_with_plan = run_masked(tiny_gpt2, graph, clean, reference, torch.ones(graph.real.shape), plan=plan)
        live_as_mask = run_masked(tiny_gpt2, graph, clean, reference, live.float())
        all_on = run_masked(tiny_gpt2, graph, clean, reference, torch.ones(graph.real.shape))
    assert torch.allclose(ones_with_plan, live_as_mask, atol=1e-5)
    assert not torch.allclose(ones_with_plan, all_on, atol=1e-3)


@pytest.mark.parametrize("scaled", [False, True])
def test_plain_probe_path_matches_the_masked_one(tiny_model, scaled):
    """Attribution's fast path (no masked sums) gives the masked path's logits and reader gradients."""
    from hap.probes import run_with_probes

    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 16)
    reference = interchange_reference(tiny_model, corrupted)
    scale = None
    if scaled:
        scale = torch.ones(graph.n_sources)
        scale[graph.sources_of_block(3)] = 0.3  # layer 1's heads interpolated
        scale[0] = 0.6  # and the embedding
    positions = torch.tensor([6, 3, 4])
    results = []
    for mask in (None, torch.ones(graph.real.shape)):
        logits, probes, outputs = run_with_probes(tiny_model, graph, clean, reference, mask, positions, scale, True)
        logits.square().sum().backward()
        grads = torch.zeros(graph.n_readers, *clean.shape, tiny_model.layout.d_model)
        for probe in probes:
            grad = probe.tensor.grad
            grads[probe.readers] = grad if grad.shape[2] == clean.shape[1] else 0.0
        results.append((logits.detach(), grads, outputs))
    (plain, plain_grads, plain_out), (masked, masked_grads, masked_out) = results
    assert torch.allclose(plain, masked, atol=1e-5)
    assert torch.allclose(plain_grads, masked_grads, rtol=1e-4, atol=1e-5)
    assert torch.allclose(plain_out, masked_out, atol=1e-5)
    assert float(plain_grads.abs().sum()) > 0


@pytest.mark.parametrize("per_example", [False, True], ids=["shared-mask", "per-example"])
@pytest.mark.parametrize("sparse", [False, True], ids=["every-edge", "sparse-plan"])
@pytest.mark.parametrize("at_answer", [False, True], ids=["every-position", "at-answers"])
def test_mask_gradients_match_the_slow_twin(tiny_model, chunk_layers, gather_cost, per_example, sparse, at_answer):
    # The gradients of the buffer's rows are added up in place across the masked sums and handed to each
    # block's sources; every mask entry's gradient must equal autograd's through the literal twin.
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 41)
    reference = interchange_reference(tiny_model, corrupted)
    generator = torch.Generator().manual_seed(42)
    live = (torch.rand(graph.real.shape, generator=generator) < 0.3) & graph.real if sparse else graph.real
    shape = (clean.shape[0], *graph.real.shape) if per_example else graph.real.shape
    values = torch.rand(shape, generator=generator) * live
    fast_mask, slow_mask = values.clone().requires_grad_(True), values.clone().requires_grad_(True)
    plan = ComputePlan.build(graph, live, reference.kind)
    weights = torch.randn(tiny_model.layout.vocab_size, generator=generator)
    positions = torch.tensor([6, 2, 4]) if at_answer else None  # the logits reader's sum at one position each
    fast = run_masked(tiny_model, graph, clean, reference, fast_mask, plan=plan, positions=positions)
    slow = naive_masked_logits(tiny_model, graph, clean, reference.outputs, slow_mask)
    if at_answer:
        slow = slow[torch.arange(3), positions]
    (fast @ weights).square().mean().backward()
    (slow @ weights).square().mean().backward()
    on_live = live.expand(shape)
    assert float(slow_mask.grad[on_live].abs().max()) > 0
    assert torch.allclose(fast_mask.grad[on_live], slow_mask.grad[on_live], atol=1e-5, rtol=1e-4)
    assert float(fast_mask.grad[~on_live].abs().sum()) == 0.0


def test_each_backward_pass_gets_its_own_gradients(tiny_model):
    # retain_graph and torch.autograd.grad run several backward passes over one masked run: each starts
    # from zero (a pass that added onto the last one's buffer gradients would double the earlier edges').
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 43)
    reference = interchange_reference(tiny_model, corrupted)
    values = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(44))

    def first_and_second(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = run_masked(tiny_model, graph, clean, reference, mask)
        return logits[..., 0].mean(), logits[..., 1].square().mean()

    once = values.clone().requires_grad_(True)
    first, _ = first_and_second(once)
    first.backward()
    twice = values.clone().requires_grad_(True)
    first, second = first_and_second(twice)
    first.backward(retain_graph=True)
    first.backward(retain_graph=True)
    assert torch.allclose(twice.grad, 2 * once.grad, atol=1e-6)
    (of_second,) = torch.autograd.grad(second, twice)
    alone = values.clone().requires_grad_(True)
    first_and_second(alone)[1].backward()
    assert torch.allclose(of_second, alone.grad, atol=1e-6)


def test_the_buffer_gradient_is_let_go_when_backward_is_done(tiny_model):
    # A graph kept alive after its backward (a training loop's last logits) must not keep a buffer-sized
    # gradient; one more pass over it (retain_graph) builds it again and gives the same mask gradient.
    graph = hap.Graph.from_model(tiny_model)
    clean, corrupted = _batch(tiny_model, 45)
    reference = interchange_reference(tiny_model, corrupted)
    mask = torch.rand(graph.real.shape, generator=torch.Generator().manual_seed(46)).requires_grad_(True)
    run = MaskedRun(tiny_model, graph, clean, reference, mask, ComputePlan.build(graph, None, reference.kind))
    logits, _ = run.run(None)
    logits.square().mean().backward(retain_graph=True)
    assert run.gradients._read and run.gradients._gradient is None
    first = mask.grad.clone()
    logits.square().mean().backward()
    assert run.gradients._gradient is None
    assert torch.allclose(mask.grad, 2 * first, atol=1e-6)
