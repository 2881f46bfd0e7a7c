"""Held-out splits: train and test never share an example; the built-in tasks' test split also
uses templates and names (nouns, centuries) no training example uses; a recorded split rebuilds
exactly the same examples, so ``hap evaluate`` reproduces what ``hap discover`` printed."""

from __future__ import annotations

import json
import re

import pytest

from hap.circuit import Circuit
from hap.cli import main
from hap.errors import DataError
from hap.models.tiny import tiny_tokenizer
from hap.tasks import TaskSpec, load_split, task_splits, validation_split
from hap.tasks import greater_than, ioi, splits


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _template_of(prompt: str, templates: tuple[str, ...]) -> str:
    """The template a prompt was made from (the one whose pattern matches it)."""
    matches = []
    for template in templates:
        pattern = re.escape(template)
        for field in ("X", "Y", "S", "PLACE", "OBJECT", "NOUN", "CENTURY"):
            pattern = pattern.replace(re.escape("{" + field + "}"), r"(\w+)")
        pattern = pattern.replace(re.escape("{START}"), r"(\d\d ?\d\d)")
        if re.fullmatch(pattern, prompt):
            matches.append(template)
    assert len(matches) == 1, (prompt, matches)
    return matches[0]


def test_ioi_splits_share_no_prompt_template_or_name(tok):
    train_spec, test_spec = task_splits("ioi", tok, 300, 120, seed=0)
    train, test = load_split(train_spec, tok), load_split(test_spec, tok)
    assert len(train) == 300 and len(test) == 120
    train_vocabulary, test_vocabulary = train_spec.vocabulary, test_spec.vocabulary
    assert not set(train_vocabulary["templates"]) & set(test_vocabulary["templates"])
    assert not set(train_vocabulary["names"]) & set(test_vocabulary["names"])
    assert len(test_vocabulary["templates"]) == len(ioi.TEMPLATES) // 4
    assert set(train_vocabulary["templates"]) | set(test_vocabulary["templates"]) == set(ioi.TEMPLATES)
    assert not set(train.clean_prompts) & set(test.clean_prompts)
    assert not set(train.corrupted_prompts) & set(test.corrupted_prompts)
    for data, vocabulary in ((train, train_vocabulary), (test, test_vocabulary)):
        names = set(vocabulary["names"])
        used_templates = set()
        for clean, corrupted in zip(data.clean_prompts, data.corrupted_prompts):
            used_templates.add(_template_of(clean, ioi.TEMPLATES))
            # Every name in both prompts (clean and the corruption's fresh ones) comes from this split's names.
            for prompt in (clean, corrupted):
                capitalised = set(re.findall(r"\b[A-Z][a-z]+\b", prompt)) & set(ioi.NAMES)
                assert capitalised <= names, (prompt, capitalised - names)
        assert used_templates <= set(vocabulary["templates"])
    assert len({_template_of(p, ioi.TEMPLATES) for p in test.clean_prompts}) == len(test_vocabulary["templates"])


def test_greater_than_splits_hold_out_templates_nouns_and_centuries(tok):
    train_spec, test_spec = task_splits("greater-than", tok, 200, 80, seed=3)
    train, test = load_split(train_spec, tok), load_split(test_spec, tok)
    for key in ("templates", "nouns", "centuries"):
        assert not set(train_spec.vocabulary[key]) & set(test_spec.vocabulary[key]), key
    assert not set(train.clean_prompts) & set(test.clean_prompts)
    for data, spec in ((train, train_spec), (test, test_spec)):
        for prompt in data.clean_prompts:
            assert _template_of(prompt, greater_than.TEMPLATES) in spec.vocabulary["templates"]
            assert re.search(r"(1\d)$", prompt).group(1) in spec.vocabulary["centuries"]
            assert prompt.split()[1] in spec.vocabulary["nouns"]


@pytest.mark.parametrize("task", ["ioi", "greater-than"])
def test_a_validation_split_is_fresh_training_distribution_and_never_a_training_example(tok, task, monkeypatch):
    train_spec, test_spec = task_splits(task, tok, 600, 50, seed=2)
    train, test = load_split(train_spec, tok), load_split(test_spec, tok)
    validation = validation_split(train_spec, tok, 300)
    assert len(validation) == 300
    assert not set(validation.clean_prompts) & set(train.clean_prompts)
    assert not set(validation.clean_prompts) & set(test.clean_prompts)
    templates = ioi.TEMPLATES if task == "ioi" else greater_than.TEMPLATES
    assert {_template_of(p, templates) for p in validation.clean_prompts} <= set(train_spec.vocabulary["templates"])
    again = validation_split(train_spec, tok, 300)
    assert again.clean_prompts == validation.clean_prompts
    assert bool((again.clean_ids == validation.clean_ids).all())

    # A draw that repeats the training examples (offset 0: the training seed itself) leaves nothing fresh.
    monkeypatch.setattr(splits, "VALIDATION_SEED_OFFSET", 0)
    with pytest.raises(DataError, match="fresh draws differ from the 600 training examples"):
        validation_split(train_spec, tok, 300)


def test_selected_rows_are_the_rows_slicing_gives(tok):
    data = load_split(task_splits("ioi", tok, 30, 10, seed=0)[0], tok)
    picked = data.select([7, 2])
    for row, i in enumerate([7, 2]):
        one = data.slice(i, i + 1)
        assert picked.clean_prompts[row] == one.clean_prompts[0]
        width = int(one.lengths[0])
        assert bool((picked.clean_ids[row, :width] == one.clean_ids[0, :width]).all())
        assert bool((picked.corrupted_ids[row, :width] == one.corrupted_ids[0, :width]).all())
        assert int(picked.answer_ids[row]) == int(one.answer_ids[0])
        assert {k: int(v[row]) for k, v in picked.named().items()} == {k: int(v[0]) for k, v in one.named().items()}
    with pytest.raises(DataError, match="row numbers"):
        data.select([30])


def test_a_file_task_has_no_validation_draw(tok, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"clean": f"a b{i}", "corrupted": f"a c{i}", "answer": " x", "wrong": " y"})
                            + "\n" for i in range(40)))
    train_spec, _ = task_splits(str(path), tok, 10, 5)
    with pytest.raises(DataError, match="--test-task or --test-fraction"):
        validation_split(train_spec, tok, 5)


def test_a_recorded_split_rebuilds_the_same_examples(tok):
    _, test_spec = task_splits("ioi", tok, 40, 30, seed=5)
    again = TaskSpec.from_dict(json.loads(json.dumps(test_spec.to_dict())))
    assert again == test_spec
    first, second = load_split(test_spec, tok), load_split(again, tok)
    assert first.clean_prompts == second.clean_prompts and first.corrupted_prompts == second.corrupted_prompts
    fewer = load_split(TaskSpec(**{**test_spec.to_dict(), "n_examples": 10}), tok)
    assert fewer.clean_prompts == first.clean_prompts[:10]  # a shorter split is a prefix of the same draw


@pytest.mark.parametrize("bad, words", [
    ([], "expected an object"),
    ({"task": "ioi", "split": "test"}, "missing n_examples"),
    ({"task": "ioi", "split": "sideways", "n_examples": 3}, "split must be one of"),
    ({"task": "ioi", "split": "test", "n_examples": 3, "vocabulary": {"names": "Mary"}}, "lists of strings"),
])
def test_a_bad_recorded_split_is_refused(bad, words):
    with pytest.raises(DataError, match=words):
        TaskSpec.from_dict(bad, source="circuit.json")


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _rows(n: int, offset: int = 0) -> list[dict[str, str]]:
    names = ioi.NAMES
    return [{"clean": f"When {names[(i + offset) % 40]} and {names[(i + offset + 1) % 40]} went out , "
                      f"{names[(i + offset + 1) % 40]} gave it to",
             "corrupted": "When Anna and Kate went out , Ruth gave it to",
             "answer": f" {names[(i + offset) % 40]}", "wrong": f" {names[(i + offset + 1) % 40]}"}
            for i in range(n)]


def test_a_custom_file_is_split_by_hash_with_no_example_on_both_sides(tok, tmp_path):
    rows = _rows(40)
    path = _write(tmp_path / "task.jsonl", rows + rows[:10])  # repeated lines must land on one side
    train_spec, test_spec = task_splits(path, tok, 1000, 1000, test_fraction=0.3)
    train, test = load_split(train_spec, tok), load_split(test_spec, tok)
    assert len(train) + len(test) == 50 and len(test) > 0 and len(train) > 0
    assert not set(train.clean_prompts) & set(test.clean_prompts)
    assert test_spec.sha256 == train_spec.sha256
    (tmp_path / "task.jsonl").write_text((tmp_path / "task.jsonl").read_text() + json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match="has changed since this split was recorded"):
        load_split(test_spec, tok)


def test_a_test_file_that_repeats_a_training_example_is_refused(tok, tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows(10))
    test = _write(tmp_path / "test.jsonl", _rows(5, offset=20) + _rows(1, offset=3))
    with pytest.raises(DataError, match="repeats a training example"):
        task_splits(train, tok, 100, 100, test_task=test)
    fine = _write(tmp_path / "fine.jsonl", _rows(5, offset=20))
    train_spec, test_spec = task_splits(train, tok, 100, 100, test_task=fine)
    assert len(load_split(test_spec, tok)) == 5 and len(load_split(train_spec, tok)) == 10


def test_a_split_with_no_example_says_how_to_fix_it(tok, tmp_path):
    path = _write(tmp_path / "one.jsonl", _rows(1))
    train_spec, test_spec = task_splits(path, tok, 10, 10, test_fraction=0.01)
    with pytest.raises(DataError, match="no example falls in the test split.*--test-task"):
        load_split(test_spec, tok)


def test_evaluate_on_the_saved_test_split_gives_the_number_discover_printed(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["discover", "--model", "tiny-llama", "--allow-weak-model", "--method", "eap", "--edges", "40", "--n-examples", "24",
                 "--n-test", "20", "--batch-size", "8", "--out", str(out), "--no-report"]) == 0
    printed = capsys.readouterr().out
    circuit = Circuit.load(out)
    assert circuit.splits["test"]["split"] == "test" and circuit.splits["train"]["split"] == "train"
    assert circuit.held_out["n_examples"] == 20 and circuit.metrics["train"]["n_examples"] == 20
    assert "test (held out)" in printed and "train (in-sample)" in printed
    assert printed.index("test (held out)") < printed.index("train (in-sample)")
    assert main(["evaluate", str(out), "--allow-weak-model", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("kl", "logit_diff", "accuracy", "faithfulness"):
        assert again[key] == circuit.held_out[key], key
    assert again["split"] == circuit.splits["test"]
    assert main(["evaluate", str(out), "--allow-weak-model", "--split", "train", "--json"]) == 0
    in_sample = json.loads(capsys.readouterr().out)
    assert in_sample["kl"] == circuit.metrics["train"]["kl"]
