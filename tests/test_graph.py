import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hap
from hap.models.gpt2 import GPT2Adapter
from hap.models.rotary import RotaryAdapter


def _layout(model_class, adapter_class, config):
    with torch.device("meta"):  # shapes only: no weights are materialised
        model = model_class(config)
    return adapter_class(model).layout


def test_gpt2_small_shape_has_the_published_edge_count():
    layout = _layout(GPT2LMHeadModel, GPT2Adapter, GPT2Config(n_layer=12, n_head=12, n_embd=768))
    graph = hap.Graph.from_layout(layout)
    assert (graph.n_sources, graph.n_readers, graph.n_edges) == (157, 445, 32491)


def test_smollm2_shape_counts_key_value_readers_per_group():
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152)
    graph = hap.Graph.from_layout(_layout(LlamaForCausalLM, RotaryAdapter, config))
    # 9 q + 3 k + 3 v readers per layer, one MLP reader, plus logits.
    assert graph.n_readers == 30 * 16 + 1
    assert graph.n_sources == 1 + 30 * 10
    assert graph.n_edges == 70651
    assert "a0.g2<k>" in graph.reader_names and "a0.h2<k>" not in graph.reader_names
    assert graph.reader_names.count("a29.g0<v>") == 1


def test_names_and_edge_rule(tiny_gpt2):
    graph = hap.Graph.from_model(tiny_gpt2)
    assert graph.source_names[:2] == ["input", "a0.h0"]
    assert graph.reader_names[-1] == "logits"
    # A head reads only earlier layers; an MLP reads the heads of its own layer.
    assert graph.real[graph.edge_index("a0.h1->m0")]
    assert graph.real[graph.edge_index("m0->a1.h0<q>")]
    with pytest.raises(KeyError):
        graph.edge_index("a1.h0->a1.h1<q>")
    with pytest.raises(KeyError):
        graph.edge_index("m2->a0.h0<q>")
    names = graph.edge_names()
    assert len(names) == graph.n_edges == len(set(names))
    assert "input->logits" in names


def test_block_slices_partition_sources_and_readers(tiny_llama):
    graph = hap.Graph.from_model(tiny_llama)
    seen_sources, seen_readers = [], []
    for block in range(graph.n_blocks):
        sources, readers = graph.sources_of_block(block), graph.readers_of_block(block)
        assert bool((graph.source_block[sources] == block).all())
        assert bool((graph.reader_block[readers] == block).all())
        seen_sources += range(sources.start, sources.stop)
        seen_readers += range(readers.start, readers.stop)
    assert seen_sources == list(range(graph.n_sources))
    assert seen_readers == list(range(graph.n_readers))


def test_pythia_160m_has_no_edges_from_a_layers_heads_to_its_parallel_mlp():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           vocab_size=50304, rotary_pct=0.25, use_parallel_residual=True)
    graph = hap.Graph.from_layout(_layout(GPTNeoXForCausalLM, RotaryAdapter, config))
    assert graph.layout.parallel_attn_mlp
    assert graph.n_edges == 32491 - 12 * 12  # GPT-2 small's shape less one edge per head
    assert not graph.real[graph.source_index("a3.h5"), graph.reader_index("m3")]
    assert graph.real[graph.edge_index("a3.h5->m4")] and graph.real[graph.edge_index("m2->m3")]
    assert graph.base_block(8) == 7 and graph.base_block(7) == 7 and graph.base_block(graph.n_blocks - 1) == 25
    sequential = GPTNeoXConfig(**{**config.to_dict(), "use_parallel_residual": False})
    assert hap.Graph.from_layout(_layout(GPTNeoXForCausalLM, RotaryAdapter, sequential)).n_edges == 32491


def test_gemma2_2b_shape_normalises_its_heads_together():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=256, intermediate_size=9216, vocab_size=256000)
    layout = _layout(Gemma2ForCausalLM, RotaryAdapter, config)
    assert layout.heads_normed_together and not layout.parallel_attn_mlp
    assert hap.Graph.from_layout(layout).n_edges == 50610


def test_top_edges_keeps_the_n_largest_as_a_sort_does(tiny_llama):
    """The fast selection against the obvious one, on scores with many ties: n real edges, none kept
    below the n-th largest |score| of a plain sort, none left out above it."""
    from hap.circuit import top_edges

    graph = hap.Graph.from_model(tiny_llama)
    scores = (torch.randn(graph.real.shape, generator=torch.Generator().manual_seed(0)) * 2).round()  # many ties
    real_scores = sorted((abs(float(value)) for value in scores[graph.real]), reverse=True)
    for n in (1, 17, 100, graph.n_edges):
        chosen = top_edges(graph, scores, n)
        assert int(chosen.sum()) == n and not bool((chosen & ~graph.real).any())
        nth = real_scores[n - 1]
        assert float(scores.abs()[chosen].min()) == nth
        assert not bool((graph.real & ~chosen & (scores.abs() > nth)).any())
    assert not bool(top_edges(graph, scores, 0).any())


def test_a_cut_through_tied_scores_is_recorded(tiny_llama):
    graph = hap.Graph.from_model(tiny_llama)
    real = graph.real.nonzero()
    values = torch.zeros(graph.real.shape)
    values[real[:5, 0], real[:5, 1]] = 2.0  # five top edges, then seven tied at 1
    values[real[5:12, 0], real[5:12, 1]] = 1.0
    scores = hap.Scores("tiny-llama", "ioi", "eap", tiny_llama.layout, values)
    split = scores.circuit(8, prune=False)
    assert split.config["tie_at_cut"] == [3, 7]
    assert split.n_edges == 8 and bool(split.in_graph[real[:5, 0], real[:5, 1]].all())  # the top five, 3 tied
    from hap.discovery import format_summary

    assert "tie at cut    3 of 7 edges of equal score kept" in format_summary(split)
    assert "tie at cut" not in format_summary(scores.circuit(12, prune=False))
    assert "tie_at_cut" not in scores.circuit(12, prune=False).config  # the whole tie kept
    assert "tie_at_cut" not in scores.circuit(5, prune=False).config  # the cut falls between two scores
