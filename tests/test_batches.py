"""Batches made on demand within a memory budget: whatever is kept (nothing, some, all, on disk),
a batch equals the one made directly, and a pruning run does not depend on the budget."""

from __future__ import annotations

import pytest
import torch

import hap
from hap.batches import ReferenceCache, TaskBatches, batches
from hap.pruning import PruningConfig, prune
from hap.reference import AblationKind, CompactReference, interchange_reference


def _same(a, b) -> bool:
    return (torch.equal(a.clean, b.clean) and torch.equal(a.positions, b.positions)
            and torch.equal(a.reference.outputs.expand_as(b.reference.outputs), b.reference.outputs)
            and torch.equal(a.reference.block_inputs, b.reference.block_inputs)
            and torch.equal(a.reference.fixed_outputs, b.reference.fixed_outputs)
            and torch.equal(a.clean_logits, b.clean_logits))


def test_a_compact_reference_expands_to_the_full_one_exactly(tiny_model):
    task = hap.load_task("ioi", tiny_model.tokenizer, 6, seed=2)
    full = interchange_reference(tiny_model, task.corrupted_ids)
    compact = CompactReference.of(tiny_model, task.corrupted_ids)
    expanded = compact.expand(tiny_model)
    assert torch.equal(expanded.outputs, full.outputs) and torch.equal(expanded.block_inputs, full.block_inputs)
    assert compact.nbytes < full.outputs.nbytes + full.block_inputs.nbytes


@pytest.mark.parametrize("kind", list(AblationKind))
@pytest.mark.parametrize("budget_batches, on_disk", [(0, False), (2, False), (100, False), (1, True)])
def test_cached_batches_equal_batches_made_directly(tiny_llama, tmp_path, kind, budget_batches, on_disk):
    graph = hap.Graph.from_model(tiny_llama)
    task = hap.load_task("ioi", tiny_llama.tokenizer, 22, seed=1)
    direct = list(batches(tiny_llama, graph, task, 5, kind))
    probe = TaskBatches(tiny_llama, graph, task, 5, kind, cache=ReferenceCache(10**12))
    probe[0]
    one_batch = probe.cache.held  # what keeping one batch costs
    cache = ReferenceCache(budget_batches * one_batch, tmp_path / "cache" if on_disk else None)
    data = TaskBatches(tiny_llama, graph, task, 5, kind, cache=cache)
    assert len(data) == len(direct) == 5
    for _ in range(2):  # the second pass reads what the first kept
        for made, fetched in zip(direct, data):
            assert _same(made, fetched)
    assert cache.held <= cache.memory_budget
    if kind is AblationKind.INTERCHANGE and not on_disk:
        assert len(cache._stored) == min(budget_batches, len(direct))
    if on_disk:
        assert len(list((tmp_path / "cache").glob("batch-*.pt"))) >= len(direct) - 1


def test_head_shares_whole_batches_and_makes_the_partial_one(tiny_gpt2):
    graph = hap.Graph.from_model(tiny_gpt2)
    task = hap.load_task("ioi", tiny_gpt2.tokenizer, 20, seed=0)
    data = TaskBatches(tiny_gpt2, graph, task, 8, cache=ReferenceCache(10**12))
    list(data)
    head = data.head(12)
    assert head.n_examples == 12 and len(head) == 2
    assert head.cache is data.cache and len(head[1].clean) == 4
    assert _same(head[0], data[0])
    assert torch.equal(head[1].clean, data[1].clean[:4])


def test_pruning_does_not_depend_on_the_memory_budget(tiny_gpt2):
    graph = hap.Graph.from_model(tiny_gpt2)
    task = hap.load_task("ioi", tiny_gpt2.tokenizer, 24, seed=0)
    config = PruningConfig(target_sparsity=0.8, steps=12, batch_size=4, seed=2)
    results = []
    for budget in (0, 10**12):
        data = TaskBatches(tiny_gpt2, graph, task, 4, cache=ReferenceCache(budget))
        results.append(prune(tiny_gpt2, task, config, data=data))
    assert torch.equal(results[0].in_graph, results[1].in_graph)
    assert torch.equal(results[0].mask_values, results[1].mask_values)
