"""Role rules: on a hand-built model whose heads attend in known ways, on evidence made to sit on either side
of each threshold, and path patching against the slow twin."""

from __future__ import annotations

import math

import pytest
import torch
from naive import naive_masked_logits
from transformers import GPT2Config, GPT2LMHeadModel

import hap
from hap.ablation import interchange_reference
from hap.evidence import EvidenceTable, NodeEvidence, node_evidence
from hap.models.tiny import tiny_tokenizer
from hap.roles import (ATTENTION_MIN, DIRECT_MIN, PATH_PATCHING_MIN, UNLABELLED, RoleContext, head_roles,
                       label_heads, path_patching, s_inhibition_candidates)
from hap.tasks import load_task

WIDTH = 64  # each of the residual's three parts: token, position, previous token
POSITIONS = 32


def _hand_built(tmp_path) -> hap.Model:
    """A 2-layer, 2-head GPT-2 whose residual has three orthogonal parts (the token's embedding, a one-hot
    position, and room for the previous token's embedding), with heads built to attend in known ways:
    a0.h0 previous-token (position i reads i-1; it copies that token into the third part), a0.h1
    duplicate-token (a token reads its earlier copies, not itself; writes nothing), a1.h0 induction
    (token t reads the position whose previous token was t), a1.h1 nothing (zero queries and keys:
    uniform attention, zero output). MLPs write nothing."""
    tokenizer = tiny_tokenizer()
    d_model, head = 3 * WIDTH, 3 * WIDTH // 2
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=POSITIONS, n_embd=d_model, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    token, position, previous = slice(0, WIDTH), slice(WIDTH, 2 * WIDTH), slice(2 * WIDTH, 3 * WIDTH)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in [model.transformer.ln_f, *(block.ln_1 for block in model.transformer.h),
                     *(block.ln_2 for block in model.transformer.h)]:
            norm.weight.fill_(1.0)
        model.transformer.wte.weight[:, token] = torch.randn(len(tokenizer), WIDTH, generator=generator)
        model.transformer.wpe.weight[:, position] = 8.0 * torch.eye(POSITIONS, WIDTH)
        q, k, v = (torch.zeros(d_model, 2, head) for _ in range(3))  # [in, head, head dim]
        out = torch.zeros(2, head, d_model)
        # a0.h0: position i queries position i-1; its value is the token, written to the previous-token part
        q[position, 0, :POSITIONS - 1] = 2.0 * torch.eye(WIDTH, POSITIONS)[:, 1:]
        k[position, 0, :POSITIONS] = torch.eye(WIDTH, POSITIONS)
        v[token, 0, :WIDTH] = torch.eye(WIDTH)
        out[0, :WIDTH, previous] = torch.eye(WIDTH)
        # a0.h1: the same token elsewhere, not at its own position
        q[token, 1, :WIDTH] = torch.eye(WIDTH)
        k[token, 1, :WIDTH] = torch.eye(WIDTH)
        q[position, 1, WIDTH:WIDTH + POSITIONS] = -3.0 * torch.eye(WIDTH, POSITIONS)
        k[position, 1, WIDTH:WIDTH + POSITIONS] = torch.eye(WIDTH, POSITIONS)
        _set_attention(model.transformer.h[0].attn, q, k, v, out)
        q, k, v = (torch.zeros(d_model, 2, head) for _ in range(3))
        out = torch.zeros(2, head, d_model)
        # a1.h0: the current token queries the previous-token part
        q[token, 0, :WIDTH] = torch.eye(WIDTH)
        k[previous, 0, :WIDTH] = torch.eye(WIDTH)
        _set_attention(model.transformer.h[1].attn, q, k, v, out)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return hap.load_model(str(tmp_path), device="cpu", dtype="float64")


def _set_attention(attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
    """Write per-head [in, head, head dim] projections into GPT-2's fused Conv1D weights ([in, out])."""
    attention.c_attn.weight.copy_(torch.cat([part.flatten(1) for part in (q, k, v)], dim=1))
    attention.c_proj.weight.copy_(out.flatten(0, 1))


def test_heads_built_to_attend_in_known_ways_get_those_roles(tmp_path):
    model = _hand_built(tmp_path)
    task = load_task("ioi", model.tokenizer, 24, seed=0)
    evidence = node_evidence(model, task, batch_size=8)
    previous, duplicate, induction = (evidence.node(name) for name in ("a0.h0", "a0.h1", "a1.h0"))
    assert previous.attends("S1+1", "S1") > 0.9
    assert duplicate.attends("S2", "S1") > 0.9
    assert induction.attends("S2", "S1+1") > 0.9
    roles = head_roles(model, task, evidence, batch_size=8)
    assert roles["a0.h0"].role == "previous-token" and roles["a0.h0"].evidence["S1+1->S1"] > 0.9
    assert roles["a0.h1"].role == "duplicate-token" and roles["a0.h1"].evidence["S2->S1"] > 0.9
    assert roles["a1.h0"].role == "induction" and roles["a1.h0"].evidence["S2->S1+1"] > 0.9
    # uniform attention over up to ~18 tokens and no output: no rule fits, nothing is forced
    assert roles["a1.h1"].role == UNLABELLED and roles["a1.h1"].rule == ""
    assert set(roles) == {"a0.h0", "a0.h1", "a1.h0", "a1.h1"}


def _head(name: str, layer: int, direct: float, **attention: float) -> NodeEvidence:
    table: dict[str, dict[str, float]] = {}
    for pair, weight in attention.items():
        source, target = pair.split("__")
        table.setdefault(source.replace("_", "+"), {})[target.replace("_", "+")] = weight
    return NodeEvidence(name, "head", layer, direct, table)


def _table(nodes: list[NodeEvidence], full: float = 2.0) -> EvidenceTable:
    return EvidenceTable(nodes, ["IO", "S1", "S1+1", "S2", "END"], "test", 10, full, [], {})


def test_each_rule_fires_just_above_its_thresholds_and_not_below():
    full = 2.0
    above, below = ATTENTION_MIN + 0.01, ATTENTION_MIN - 0.01
    strong, weak = (DIRECT_MIN + 0.01) * full, (DIRECT_MIN - 0.01) * full
    nodes = [_head("a5.h0", 5, strong, END__IO=above), _head("a5.h1", 5, strong, END__IO=below),
             _head("a5.h2", 5, weak, END__IO=above), _head("a5.h3", 5, -strong, END__IO=above),
             _head("a1.h0", 1, 0.0, S2__S1_1=above), _head("a1.h1", 1, 0.0, S2__S1_1=below),
             _head("a1.h2", 1, 0.0, S2__S1=above), _head("a1.h3", 1, 0.0, S1_1__S1=above),
             _head("a1.h4", 1, 0.0, S2__S1=below, S1_1__S1=below),
             _head("a2.h0", 2, 0.0, S2__S1=above, S1_1__S1=above)]
    roles = label_heads(_table(nodes, full), RoleContext(full))
    assert roles["a5.h0"].role == "name mover"
    assert roles["a5.h0"].evidence == {"END->IO": round(above, 4), "direct_effect": round(strong, 4),
                                       "direct_share": round(DIRECT_MIN + 0.01, 4)}
    assert roles["a5.h1"].role == UNLABELLED and roles["a5.h2"].role == UNLABELLED
    assert roles["a5.h3"].role == "negative name mover"
    assert roles["a1.h0"].role == "induction" and roles["a1.h1"].role == UNLABELLED
    assert roles["a1.h2"].role == "duplicate-token" and roles["a1.h3"].role == "previous-token"
    assert roles["a1.h4"].role == UNLABELLED
    assert roles["a2.h0"].role == "duplicate-token" and roles["a2.h0"].also == ["previous-token"]


def test_s_inhibition_needs_the_attention_and_the_path_patching_drop():
    full = 2.0
    nodes = [_head("a3.h0", 3, 0.0, END__S2=0.25, END__S1=0.1), _head("a3.h1", 3, 0.0, END__S2=0.25),
             _head("a3.h2", 3, 0.0, END__S2=0.5), _head("a6.h0", 6, 0.5, END__IO=0.6),
             _head("a7.h0", 7, 0.0, END__S2=0.9)]
    table = _table(nodes, full)
    movers = ["a6.h0"]
    candidates = s_inhibition_candidates(table, movers)
    assert candidates == {"a3.h0": movers, "a3.h2": movers}  # a3.h1 attends too little; a7.h0 is after a6.h0
    drops = {"a3.h0": (PATH_PATCHING_MIN + 0.01) * full, "a3.h2": (PATH_PATCHING_MIN - 0.01) * full}
    roles = label_heads(table, RoleContext(full, drops, candidates))
    assert roles["a3.h0"].role == "S-inhibition" and "a6.h0" in roles["a3.h0"].detail
    assert roles["a3.h0"].evidence["path_patching_drop"] == pytest.approx(drops["a3.h0"], abs=1e-4)
    assert roles["a3.h2"].role == UNLABELLED  # attends S, but patching its path to the name movers costs little
    assert roles["a7.h0"].role == UNLABELLED and roles["a6.h0"].role == "name mover"


def test_path_patching_equals_the_slow_twin(tiny_gpt2_64):
    model = tiny_gpt2_64
    task = load_task("ioi", model.tokenizer, 6, seed=4)
    senders = {"a0.h1": ["a2.h0", "a1.h3"], "a1.h2": ["a2.h3"]}
    drops = path_patching(model, task, senders, batch_size=4)
    graph = hap.Graph.from_model(model)
    reference = interchange_reference(model, task.corrupted_ids)
    rows = torch.arange(len(task))
    with torch.no_grad():
        full = task.logit_diff(model.hf_model(task.clean_ids).logits[rows, task.answer_positions]).mean()
        for sender, receivers in senders.items():
            mask = graph.real.to(torch.float64)
            for receiver in receivers:
                mask[graph.source_index(sender), graph.reader_index(f"{receiver}<q>")] = 0.0
            logits = naive_masked_logits(model, graph, task.clean_ids, reference.outputs, mask)
            patched = task.logit_diff(logits[rows, task.answer_positions]).mean()
            assert drops[sender] == pytest.approx(float(full - patched), abs=1e-9)
            assert not math.isclose(drops[sender], 0.0, abs_tol=1e-6)  # the edges matter in this model


def test_a_head_that_attends_s_and_raises_the_metric_directly_is_s_suppression_not_its_side_pattern():
    full = 2.0
    strong = (DIRECT_MIN + 0.01) * full
    nodes = [_head("a6.h3", 6, strong, END__S2=0.5, S1_1__S1=0.35),  # attends S2 at END, +direct, also prev-token
             _head("a6.h4", 6, 0.0, END__S2=0.5, S1_1__S1=0.35)]  # the same attention, no direct effect
    roles = label_heads(_table(nodes, full), RoleContext(full))
    assert roles["a6.h3"].role == "S-suppression" and roles["a6.h3"].also == ["previous-token"]
    assert roles["a6.h4"].role == "previous-token"
