"""Tests of hap.tasks: IOI, greater-than and custom JSONL tasks, and TaskData itself.

Fast tests use the tiny word-level tokenizer (plus two variants of it that split
years like GPT-2 and like SmolLM2); tests marked ``slow`` use the real SmolLM2
tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hap.errors import DataError
from hap.models.tiny import tiny_tokenizer
from hap.models.tiny_vocab import tiny_vocabulary
from hap.tasks import BUILT_IN_TASKS, Metric, TaskData, YearScheme, load_split, load_task, task_splits, year_tokens
from hap.tasks.base import encode, make_task_data
from hap.tasks.ioi import NAMES as IOI_NAMES


def word_tokenizer(vocabulary: list[str], *extra_pre_tokenizers) -> PreTrainedTokenizerFast:
    """A word-level tokenizer like the tiny one, with extra pre-tokenizers after the whitespace split."""
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocabulary)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), *extra_pre_tokenizers])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def tokens(tokenizer, ids: torch.Tensor) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids.tolist())


# ----------------------------------------------------------------------------- IOI


def test_ioi_rows_have_equal_lengths_and_right_padding(tok):
    data = load_task("ioi", tok, 40, seed=1)
    assert len(data) == 40 and data.clean_ids.shape == data.corrupted_ids.shape
    for i in range(len(data)):
        n = int(data.lengths[i])
        assert len(encode(tok, data.clean_prompts[i])) == n == len(encode(tok, data.corrupted_prompts[i]))
        assert data.clean_ids[i, :n].tolist() == encode(tok, data.clean_prompts[i])
        assert data.corrupted_ids[i, :n].tolist() == encode(tok, data.corrupted_prompts[i])
        assert (data.clean_ids[i, n:] == tok.pad_token_id).all()
        assert (data.corrupted_ids[i, n:] == tok.pad_token_id).all()
    assert int(data.lengths.max()) == data.clean_ids.shape[1]
    assert tok.unk_token_id not in data.clean_ids.tolist()  # every template word is in the tiny vocabulary


def test_ioi_answers_are_single_token_names_in_the_prompt(tok):
    data = load_task("ioi", tok, 30)
    for i in range(len(data)):
        answer, wrong = tok.decode([int(data.answer_ids[i])]), tok.decode([int(data.wrong_ids[i])])
        assert len(encode(tok, " " + answer)) == 1 and len(encode(tok, " " + wrong)) == 1
        assert answer != wrong and answer != tok.unk_token
        row = data.clean_ids[i, : data.lengths[i]].tolist()
        assert row.count(int(data.answer_ids[i])) == 1  # the indirect object is named once
        assert row.count(int(data.wrong_ids[i])) == 2  # the subject twice


def test_ioi_is_reproducible_from_its_seed(tok):
    a, b, c = load_task("ioi", tok, 20, seed=3), load_task("ioi", tok, 20, seed=3), load_task("ioi", tok, 20, seed=4)
    assert a.clean_prompts == b.clean_prompts and a.corrupted_prompts == b.corrupted_prompts
    assert torch.equal(a.clean_ids, b.clean_ids) and torch.equal(a.answer_ids, b.answer_ids)
    assert a.clean_prompts != c.clean_prompts


def test_ioi_balances_abba_and_baba(tok):
    data = load_task("ioi", tok, 24)
    orders = []
    for i in range(len(data)):
        row = data.clean_ids[i].tolist()
        io_first = row.index(int(data.answer_ids[i])) < row.index(int(data.wrong_ids[i]))
        orders.append("ABBA" if io_first else "BABA")
    assert orders.count("ABBA") == orders.count("BABA") == 12
    assert orders[:4] == ["ABBA", "BABA", "ABBA", "BABA"]


def test_ioi_corruption_uses_three_fresh_distinct_names(tok):
    data = load_task("ioi", tok, 40, seed=2)
    for i in range(len(data)):
        n = int(data.lengths[i])
        clean, corrupted = data.clean_ids[i, :n], data.corrupted_ids[i, :n]
        changed = (clean != corrupted).nonzero()[:, 0]
        assert len(changed) == 3  # the two first mentions and the repeated subject
        fresh = set(corrupted[changed].tolist())
        assert len(fresh) == 3
        assert fresh.isdisjoint({int(data.answer_ids[i]), int(data.wrong_ids[i])})
        assert set(clean[changed].tolist()) == {int(data.answer_ids[i]), int(data.wrong_ids[i])}


def test_ioi_with_too_few_single_token_names_raises(tok):
    kept = {"Mary", "John", "Tom", "James"}  # four names: one short of two clean + three fresh
    vocabulary = [w for w in tiny_vocabulary() if w not in set(IOI_NAMES) - kept]
    with pytest.raises(DataError, match=rf"only 4 of {len(IOI_NAMES)} names .*at least 5"):
        load_task("ioi", word_tokenizer(vocabulary), 4)


# ----------------------------------------------------------------------------- greater-than


def start_year(prompt: str) -> int:
    return int(re.search(r"\b1\d ?(\d\d)\b", prompt).group(1))


def century(prompt: str) -> str:
    return re.search(r"(1\d)$", prompt).group(1)


def test_greater_than_tiny_tokenizer_uses_spaced_two_digit_words(tok):
    assert year_tokens(tok).scheme is YearScheme.SPACED
    data = load_task("greater-than", tok, 30, seed=5)
    assert data.metric is Metric.PROB_DIFF
    candidates = tokens(tok, data.candidate_ids)
    assert candidates == [f"{yy:02d}" for yy in range(100)]
    for i in range(len(data)):
        yy = start_year(data.clean_prompts[i])
        assert 2 <= yy <= 98 and start_year(data.corrupted_prompts[i]) == 1
        c = century(data.clean_prompts[i])
        assert f" {c} {yy:02d} " in data.clean_prompts[i] and f" {c} 01 " in data.corrupted_prompts[i]
        assert data.good_mask[i].tolist() == [v > yy for v in range(100)]
        assert data.bad_mask[i].tolist() == [v <= yy for v in range(100)]
        assert tokens(tok, data.answer_ids[i : i + 1]) == [f"{yy + 1:02d}"]
        assert tokens(tok, data.wrong_ids[i : i + 1]) == [f"{yy:02d}"]
        assert int(data.lengths[i]) == len(encode(tok, data.corrupted_prompts[i]))


def test_greater_than_gpt2_style_two_digit_split():
    tokenizer = word_tokenizer(tiny_vocabulary(), pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"))
    assert encode(tokenizer, " 1745") == encode(tokenizer, "17 45")  # "1745" -> "17" + "45"
    assert year_tokens(tokenizer).scheme is YearScheme.TWO_DIGIT
    data = load_task("greater-than", tokenizer, 10)
    for i in range(len(data)):
        yy = start_year(data.clean_prompts[i])
        c = century(data.clean_prompts[i])
        assert f"{c}{yy:02d}" in data.clean_prompts[i] and f"{c}01" in data.corrupted_prompts[i]
        assert data.good_mask[i].tolist() == [v > yy for v in range(100)]


def test_greater_than_digit_split_predicts_the_tens_digit():
    vocabulary = tiny_vocabulary() + [str(d) for d in range(10)]
    tokenizer = word_tokenizer(vocabulary, pre_tokenizers.Digits(individual_digits=True))
    assert year_tokens(tokenizer).scheme is YearScheme.DIGIT
    data = load_task("greater-than", tokenizer, 40, seed=1)
    assert tokens(tokenizer, data.candidate_ids) == [str(d) for d in range(10)]
    for i in range(len(data)):
        yy = start_year(data.clean_prompts[i])
        tens = yy // 10
        assert 10 <= yy <= 89
        assert data.good_mask[i].tolist() == [d > tens for d in range(10)]
        assert data.bad_mask[i].tolist() == [d < tens for d in range(10)]
        assert not data.good_mask[i, tens] and not data.bad_mask[i, tens]  # the equal tens digit is ambiguous
        assert tokens(tokenizer, data.answer_ids[i : i + 1]) == [str(tens + 1)]
        assert tokens(tokenizer, data.wrong_ids[i : i + 1]) == [str(tens - 1)]


def test_greater_than_metric_sign_on_hand_made_logits(tok):
    data = load_task("greater-than", tok, 6, seed=7)
    vocab = len(tok)
    logits = torch.zeros(len(data), vocab)
    good_row = torch.full((len(data), vocab), -30.0)
    bad_row = torch.full((len(data), vocab), -30.0)
    for i in range(len(data)):
        good_row[i, data.answer_ids[i]] = 30.0
        bad_row[i, data.wrong_ids[i]] = 30.0
    assert torch.allclose(data.logit_diff(good_row), torch.ones(len(data)), atol=1e-4)
    assert torch.allclose(data.logit_diff(bad_row), -torch.ones(len(data)), atol=1e-4)
    assert data.correct(good_row).all() and not data.correct(bad_row).any()
    # Uniform logits: the difference is (|good| - |bad|) / V.
    expected = (data.good_mask.sum(1) - data.bad_mask.sum(1)).float() / vocab
    assert torch.allclose(data.logit_diff(logits), expected, atol=1e-6)


def test_greater_than_rejects_a_tokenizer_without_year_tokens():
    vocabulary = [w for w in tiny_vocabulary() if not w.isdigit()]
    with pytest.raises(DataError, match="greater-than: this tokenizer splits years"):
        load_task("greater-than", word_tokenizer(vocabulary), 3)


# ----------------------------------------------------------------------------- custom JSONL

GOOD = {
    "clean": "When Mary and John went out , John gave it to",  # 11 tokens
    "corrupted": "When Anna and Kate went out , Ruth gave it to",
    "answer": " Mary",
    "wrong": " John",
}


def write_lines(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def line(**changes) -> str:
    return json.dumps({**GOOD, **changes})


def test_custom_task_loads_and_caps_examples(tok, tmp_path):
    path = write_lines(tmp_path, line(), "", line(answer=" Tom", wrong=" Sam"), line())
    data = load_task(path, tok, 10)
    assert data.name == path and len(data) == 3 and data.metric is Metric.LOGIT_DIFF
    assert tokens(tok, data.answer_ids) == ["Mary", "Tom", "Mary"]
    assert tokens(tok, data.wrong_ids) == ["John", "Sam", "John"]
    assert data.clean_prompts[0] == GOOD["clean"]
    assert len(load_task(path, tok, 2)) == 2


@pytest.mark.parametrize(
    "bad_line, pattern",
    [
        ('{"clean": "When Mary"', r"line 3: invalid JSON"),
        ("[1, 2]", r"line 3: expected a JSON object, got list"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "wrong"}), r"line 3: missing field wrong; every line needs"),
        (json.dumps({"clean": "a"}), r"line 3: missing fields corrupted, answer, wrong"),
        (line()[:-1] + ', "answer": " Tom"}', r"line 3: field 'answer' appears more than once"),
        (line(corrupted="When Anna went out , Ruth gave it to"),
         r"line 3: .*clean prompt is 11 tokens but the corrupted prompt is 9 tokens"),
        (line(answer=" Mary Jane"),
         r"line 3: answer ' Mary Jane' is 2 tokens \('Mary', 'Jane'\); it must be exactly one"),
        (line(wrong=""), r"line 3: wrong '' is 0 tokens"),
        (line(wrong=" Zebedee"), r"line 3: wrong ' Zebedee' is the unknown token '\[UNK\]'"),
        (line(answer=5), r"line 3: field 'answer' must be a string, got int \(5\)"),
        (line(clean="", corrupted=""), r"line 3: the clean prompt is empty"),
    ],
)  # fmt: skip
def test_custom_task_bad_line_names_file_and_line(tok, tmp_path, bad_line, pattern):
    path = write_lines(tmp_path, line(), "", bad_line, line())
    with pytest.raises(DataError, match=pattern) as error:
        load_task(path, tok, 10)
    assert str(error.value).startswith(path + ", line 3: ")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_custom_task_empty_file(tok, tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.jsonl has no examples .*one JSON object per line"):
        load_task(str(path), tok, 5)


# ----------------------------------------------------------------------------- load_task errors


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_n_examples_raises(tok, n):
    with pytest.raises(DataError, match="n_examples must be a positive integer"):
        load_task("ioi", tok, n)


def test_unknown_task_lists_built_ins(tok):
    with pytest.raises(DataError, match=r"unknown task 'iio'.*ioi, greater-than.*\.jsonl") as error:
        load_task("iio", tok, 5)
    assert all(name in str(error.value) for name in BUILT_IN_TASKS)


def test_missing_jsonl_file_raises(tok, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task(str(tmp_path / "nope.jsonl"), tok, 5)


# ----------------------------------------------------------------------------- TaskData


def hand_made(tok) -> TaskData:
    clean = ["Mary went to", "When Mary and John went to the", "John", "Tom and Sam"]
    corrupted = ["Anna went to", "When Anna and Kate went to the", "Kate", "Tim and Ben"]
    ids = lambda words: [encode(tok, " " + w)[0] for w in words]  # noqa: E731
    answers, wrongs = ids(["the", "store", "and", "went"]), ids(["a", "park", "or", "go"])
    return make_task_data("hand", tok, clean, corrupted, answers, wrongs)


def test_batches_are_consecutive_and_trimmed(tok):
    data = hand_made(tok)
    assert data.lengths.tolist() == [3, 7, 1, 3] and data.clean_ids.shape == (4, 7)
    batches = list(data.batches(2))
    assert [len(b) for b in batches] == [2, 2]
    assert [b.clean_ids.shape[1] for b in batches] == [7, 3]
    assert batches[1].clean_prompts == ["John", "Tom and Sam"]
    assert torch.equal(batches[1].corrupted_ids, data.corrupted_ids[2:, :3])
    assert torch.equal(torch.cat([b.answer_ids for b in data.batches(3)]), data.answer_ids)
    assert [b.clean_ids.shape for b in data.batches(3)] == [(3, 7), (1, 3)]
    with pytest.raises(DataError, match="batch_size"):
        next(data.batches(0))


def test_batches_slice_greater_than_sets(tok):
    data = load_task("greater-than", tok, 5)
    last = list(data.batches(2))[-1]
    assert last.good_mask.shape == (1, 100) and torch.equal(last.good_mask, data.good_mask[4:])


def test_logit_diff_and_correct_on_hand_made_logits(tok):
    data = hand_made(tok)
    logits = torch.zeros(4, len(tok))
    logits[torch.arange(4), data.answer_ids] = torch.tensor([3.0, 1.0, 0.0, -2.0])
    logits[torch.arange(4), data.wrong_ids] = torch.tensor([1.0, 2.0, 0.0, -5.0])
    assert data.logit_diff(logits).tolist() == [2.0, -1.0, 0.0, 3.0]
    assert data.correct(logits).tolist() == [True, False, False, True]
    with pytest.raises(DataError, match="expected logits of shape"):
        data.logit_diff(logits[:3])


def test_at_answer_picks_the_last_real_position(tok):
    data = hand_made(tok)
    full = torch.arange(4 * 7, dtype=torch.float).reshape(4, 7, 1).expand(4, 7, 5)
    picked = data.at_answer(full)
    assert picked.shape == (4, 5) and picked[:, 0].tolist() == [2.0, 13.0, 14.0, 23.0]


def test_unequal_lengths_are_rejected_by_make_task_data(tok):
    with pytest.raises(DataError, match="example 1: clean prompt is 2 tokens and corrupted prompt is 1 tokens"):
        make_task_data("x", tok, ["Mary", "Mary went"], ["Anna", "Anna"], [1, 1], [2, 2])


# ----------------------------------------------------------------------------- real tokenizer (slow)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import hap

    return hap.load_model("smollm2-135m").tokenizer


@pytest.mark.slow
def test_ioi_with_smollm2_tokenizer(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    # Every template with every name of both splits tokenises to equal clean/corrupted lengths
    # (make_task_data refuses a pair that does not): many examples reach every template.
    train_spec, test_spec = task_splits("ioi", tokenizer, 2000, 600)
    assert len(load_split(train_spec, tokenizer)) == 2000 and len(load_split(test_spec, tokenizer)) == 600
    assert len(test_spec.vocabulary["names"]) >= 20
    data = load_task("ioi", tokenizer, 60)
    for i in range(len(data)):
        n = int(data.lengths[i])
        assert len(encode(tokenizer, data.clean_prompts[i])) == n == len(encode(tokenizer, data.corrupted_prompts[i]))
        for token in (data.answer_ids[i], data.wrong_ids[i]):
            word = tokenizer.decode([int(token)])
            assert word.startswith(" ") and encode(tokenizer, word) == [int(token)]
        assert (data.clean_ids[i, :n] != data.corrupted_ids[i, :n]).sum() == 3


@pytest.mark.slow
def test_greater_than_with_smollm2_tokenizer(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    assert tokenizer.convert_ids_to_tokens(encode(tokenizer, " 1745")) == ["Ġ", "1", "7", "4", "5"]
    assert year_tokens(tokenizer).scheme is YearScheme.DIGIT
    data = load_task("greater-than", tokenizer, 40)
    assert tokenizer.convert_ids_to_tokens(data.candidate_ids.tolist()) == [str(d) for d in range(10)]
    for i in range(len(data)):
        n = int(data.lengths[i])
        assert len(encode(tokenizer, data.clean_prompts[i])) == n == len(encode(tokenizer, data.corrupted_prompts[i]))
        century = data.clean_prompts[i][-2:]
        assert tokenizer.convert_ids_to_tokens(data.clean_ids[i, n - 3 : n].tolist()) == ["Ġ", "1", century[1]]
        tens = start_year(data.clean_prompts[i]) // 10
        assert data.good_mask[i].nonzero()[:, 0].tolist() == list(range(tens + 1, 10))
