"""The BOS token and the full model's own competence.

Prompts are tokenised as the model's tokenizer does by default: a tokenizer that prepends BOS (Llama,
Gemma, Mistral; here a tiny Gemma checkpoint saved as a Hugging Face directory whose tokenizer has
``add_bos_token``) gets it in every task path, and its ids equal ``tokenizer(text)``'s; one that adds
none (the tiny built-in models, SmolLM2) is unchanged. ``--bos``/``--no-bos`` override, the choice is
recorded in ``run.json`` and ``circuit.json``, and re-scoring rebuilds the same ids. A full model that
fails the task stops ``discover`` and ``evaluate`` unless ``--allow-weak-model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GemmaConfig, GemmaForCausalLM, PreTrainedTokenizerFast

import hap
from hap.circuit import Circuit
from hap.cli import main
from hap.discovery import DiscoverConfig
from hap.errors import DataError, WeakModelError
from hap.evaluation import FullModelCheck, evaluate, require_capable_model
from hap.models.tiny import tiny_tokenizer
from hap.models.tiny_vocab import tiny_vocabulary
from hap.plain_run import answer_logits
from hap.report import load_mib, write_mib
from hap.tasks import (TaskSpec, custom_task, default_prefix, greater_than_task, ioi_task, load_split, load_task,
                       prompt_prefix, task_splits)
from hap.tasks.base import encode
from hap.verify import describe_task_check, verify_model

SMALL = ["--n-examples", "8", "--n-test", "8", "--batch-size", "4", "--no-report"]


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny word-level vocabulary with a tokenizer that prepends [BOS] by default, as Gemma's does."""
    vocab = {word: i for i, word in enumerate(tiny_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", add_bos_token=True)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
    """A tiny random Gemma checkpoint with a BOS-prepending tokenizer, saved as a user's model directory."""
    tokenizer = bos_tokenizer()
    config = GemmaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = GemmaForCausalLM(config)
    folder = tmp_path_factory.mktemp("gemma-bos")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def gemma(gemma_dir) -> hap.Model:
    return hap.load_model(gemma_dir, device="cpu")


def rows(ids: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(ids, lengths)]


# -- tokenising ----------------------------------------------------------------------------------------------
def test_the_prefix_is_what_the_tokenizer_prepends(gemma):
    bos = gemma.tokenizer.bos_token_id
    assert gemma.tokenizer("When Mary").input_ids[0] == bos  # the saved directory keeps add_bos_token
    assert default_prefix(gemma.tokenizer) == [bos]
    assert prompt_prefix(gemma.tokenizer, None) == [bos] and prompt_prefix(gemma.tokenizer, False) == []
    plain = tiny_tokenizer()
    assert default_prefix(plain) == [] and prompt_prefix(plain, None) == []
    assert prompt_prefix(plain, True) == [plain.bos_token_id]  # --bos on a tokenizer that adds none
    no_bos_token = PreTrainedTokenizerFast(tokenizer_object=plain.backend_tokenizer, unk_token="[UNK]")
    with pytest.raises(DataError, match="no BOS token"):
        prompt_prefix(no_bos_token, True)


def _custom_file(tmp_path: Path, swap: bool = False, n: int = 12) -> Path:
    """IOI-like rows, answer and wrong as given (``swap``: exchanged)."""
    names = ["Mary", "John", "Tom", "James", "Alice", "Bob", "Kate", "Leo"]
    lines = []
    for i in range(n):
        io, s = names[i % len(names)], names[(i + 3) % len(names)]
        a, b = names[(i + 1) % len(names)], names[(i + 5) % len(names)]
        answer, wrong = (f" {s}", f" {io}") if swap else (f" {io}", f" {s}")
        lines.append(json.dumps({"clean": f"When {io} and {s} went to the store , {s} gave a drink to",
                                 "corrupted": f"When {a} and {b} went to the store , {b} gave a drink to",
                                 "answer": answer, "wrong": wrong}))
    path = tmp_path / ("swapped.jsonl" if swap else "task.jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_generator_feeds_bos_and_its_ids_are_the_tokenizers(gemma, tmp_path):
    tokenizer = gemma.tokenizer
    bos = tokenizer.bos_token_id
    tasks = [ioi_task(tokenizer, 12, seed=1), greater_than_task(tokenizer, 12, seed=1),
             custom_task(_custom_file(tmp_path), tokenizer, 12), load_task("ioi", tokenizer, 6)]
    for task in tasks:
        assert task.bos
        for ids, text in zip(rows(task.clean_ids, task.lengths), task.clean_prompts):
            assert ids == tokenizer(text).input_ids and ids[0] == bos
        for ids, text in zip(rows(task.corrupted_ids, task.lengths), task.corrupted_prompts):
            assert ids == tokenizer(text).input_ids  # clean and corrupted still pair up token for token
    ioi = tasks[0]
    # the answer is bare, and it is the very token that follows the prompt in context
    for ids, text, answer in zip(rows(ioi.clean_ids, ioi.lengths), ioi.clean_prompts, ioi.answer_ids.tolist()):
        name = tokenizer.decode([answer]).strip()
        assert tokenizer(f"{text} {name}").input_ids == ids + [answer]
        assert encode(tokenizer, f" {name}") == [answer]
    # greater-than's candidates (the year tokens) are bare too
    gt = tasks[1]
    assert bos not in gt.candidate_ids.tolist() and bos not in gt.answer_ids.tolist()


def test_no_bos_and_a_tokenizer_without_one_give_the_bare_ids(gemma, tiny_llama):
    off = ioi_task(gemma.tokenizer, 8, seed=1, bos=False)
    on = ioi_task(gemma.tokenizer, 8, seed=1)
    assert not off.bos and torch.equal(on.lengths, off.lengths + 1)
    assert rows(off.clean_ids, off.lengths) == [row[1:] for row in rows(on.clean_ids, on.lengths)]
    plain = ioi_task(tiny_llama.tokenizer, 8, seed=1)  # the tiny models' tokenizer adds nothing: unchanged
    assert not plain.bos
    assert rows(plain.clean_ids, plain.lengths) == [encode(tiny_llama.tokenizer, t) for t in plain.clean_prompts]
    forced = ioi_task(tiny_llama.tokenizer, 8, seed=1, bos=True)
    assert forced.bos and all(row[0] == tiny_llama.tokenizer.bos_token_id
                              for row in rows(forced.clean_ids, forced.lengths))


def test_splits_record_the_choice_and_rebuild_the_same_ids(gemma):
    train, test = task_splits("ioi", gemma.tokenizer, 8, 8, seed=2)
    assert train.bos is True and test.bos is True and "BOS first" in test.describe()
    again = TaskSpec.from_dict(json.loads(json.dumps(test.to_dict())))
    assert torch.equal(load_split(again, gemma.tokenizer).clean_ids, load_split(test, gemma.tokenizer).clean_ids)
    old = {key: value for key, value in test.to_dict().items() if key != "bos"}  # a file from before
    assert not load_split(TaskSpec.from_dict(old), gemma.tokenizer).bos  # its ids were BOS-less: so they stay
    train_off, _ = task_splits("ioi", gemma.tokenizer, 8, 8, seed=2, bos=False)
    assert train_off.bos is False
    with pytest.raises(DataError, match="tracr"):
        task_splits("tracr-reverse", gemma.tokenizer, 8, 8, bos=False)


# -- every command -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bos_runs(gemma_dir, tmp_path_factory) -> dict[str, Path]:
    """Two runs on the BOS checkpoint (the tokenizer's default, with the curve) and one with --no-bos."""
    base = tmp_path_factory.mktemp("bos-runs")
    common = ["discover", "--model", gemma_dir, "--edges", "30", "--allow-weak-model", *SMALL]
    assert main([*common, "--method", "eap", "--curve", "--out", str(base / "eap")]) == 0
    assert main([*common, "--method", "eap-ig-inputs", "--out", str(base / "ig")]) == 0
    assert main([*common, "--method", "eap", "--no-bos", "--out", str(base / "nobos")]) == 0
    return {"eap": base / "eap", "ig": base / "ig", "nobos": base / "nobos"}


def _document(run: Path) -> dict:
    return json.loads((run / "circuit.json").read_text())


def test_discover_records_bos_in_run_json_and_circuit_json(bos_runs):
    for name, expected in (("eap", True), ("ig", True), ("nobos", False)):
        document = _document(bos_runs[name])
        assert document["splits"]["train"]["bos"] is expected and document["splits"]["test"]["bos"] is expected
        assert json.loads((bos_runs[name] / "run.json").read_text())["bos"] is expected
    with_bos, without = _document(bos_runs["eap"]), _document(bos_runs["nobos"])
    # the model saw other ids: its own numbers differ
    assert with_bos["metrics"]["test"]["full_model"]["logit_diff"] != without["metrics"]["test"]["full_model"][
        "logit_diff"]


def test_evaluate_rebuilds_the_recorded_ids(bos_runs, capsys):
    for name in ("eap", "nobos"):
        capsys.readouterr()
        assert main(["evaluate", str(bos_runs[name]), "--json", "--allow-weak-model"]) == 0
        measured = json.loads(capsys.readouterr().out)
        recorded = _document(bos_runs[name])["metrics"]["test"]
        assert measured["split"]["bos"] is (name == "eap")
        for key in ("kl", "logit_diff", "accuracy"):
            assert measured[key] == pytest.approx(recorded[key], abs=1e-6)
            assert measured["full_model"][key] == pytest.approx(recorded["full_model"][key], abs=1e-6)
    # --no-bos overrides the record: other ids, other numbers
    assert main(["evaluate", str(bos_runs["eap"]), "--json", "--no-bos", "--allow-weak-model"]) == 0
    overridden = json.loads(capsys.readouterr().out)
    assert overridden["split"]["bos"] is False
    assert overridden["full_model"]["logit_diff"] == pytest.approx(
        _document(bos_runs["nobos"])["metrics"]["test"]["full_model"]["logit_diff"], abs=1e-6)
    # a fresh draw follows the circuit's convention
    assert main(["evaluate", str(bos_runs["eap"]), "--json", "--seed", "7", "--allow-weak-model"]) == 0
    assert json.loads(capsys.readouterr().out)["split"]["bos"] is True


def test_the_curve_is_measured_on_the_recorded_ids(bos_runs, capsys):
    stored = _document(bos_runs["eap"])["metrics"]["curve"]
    capsys.readouterr()
    assert main(["curve", str(bos_runs["eap"]), "--no-write", "--allow-weak-model"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cpr"] == pytest.approx(stored["cpr"], abs=1e-6) and again["cmd"] == pytest.approx(stored["cmd"],
                                                                                                   abs=1e-6)
    assert main(["curve", str(bos_runs["eap"]), "--no-write", "--no-bos", "--allow-weak-model"]) == 0
    assert json.loads(capsys.readouterr().out)["faithfulness_abs"] != stored["faithfulness_abs"]


def test_an_ensemble_of_bos_runs_is_measured_with_bos(bos_runs, tmp_path, capsys):
    out = tmp_path / "ens"
    assert main(["ensemble", str(bos_runs["eap"]), str(bos_runs["ig"]), "--edges", "20", "--out", str(out),
                 "--no-report"]) == 0
    document = _document(out)
    assert document["splits"]["test"]["bos"] is True
    assert document["metrics"]["test"]["full_model"]["logit_diff"] == pytest.approx(
        _document(bos_runs["eap"])["metrics"]["test"]["full_model"]["logit_diff"], abs=1e-6)
    capsys.readouterr()
    assert main(["ensemble", str(bos_runs["eap"]), str(bos_runs["nobos"]), "--edges", "20",
                 "--out", str(tmp_path / "mixed")]) == 2  # runs of other ids are not one held-out split
    assert "BOS" in capsys.readouterr().err


def test_an_mib_export_is_evaluated_on_the_same_bos_ids(bos_runs, gemma, tmp_path):
    circuit = Circuit.load(bos_runs["eap"] / "circuit.json")
    loaded = load_mib(write_mib(circuit, tmp_path / "importances.json"))
    spec = TaskSpec.from_dict(loaded.splits["test"])
    task = load_split(spec, gemma.tokenizer)
    assert task.bos and all(row[0] == gemma.tokenizer.bos_token_id for row in task.clean_ids.tolist())
    metrics = evaluate(gemma, loaded, task, batch_size=4)
    assert metrics.kl == pytest.approx(circuit.metrics["test"]["kl"], abs=1e-6)
    # a file without hap's metadata (as EAP-IG writes it) is drawn as MIB does: with the tokenizer's BOS
    assert load_task(loaded.task, gemma.tokenizer, 4).bos


def test_an_old_circuit_file_is_re_evaluated_bos_less_and_says_so(bos_runs, tmp_path, capsys):
    document = _document(bos_runs["nobos"])
    for spec in document["splits"].values():
        del spec["bos"]  # as written before hap recorded it
    old = tmp_path / "old.json"
    old.write_text(json.dumps(document))
    capsys.readouterr()
    assert main(["evaluate", str(old), "--allow-weak-model"]) == 0
    out = capsys.readouterr().out
    assert "found before hap recorded the BOS token" in out and "--bos" in out
    assert main(["evaluate", str(old), "--json", "--allow-weak-model"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["split"]["bos"] is False
    assert measured["kl"] == pytest.approx(document["metrics"]["test"]["kl"], abs=1e-6)


def test_a_resumed_run_keeps_its_convention(gemma_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["discover", "--model", gemma_dir, "--method", "ep", "--edges", "30", "--steps", "3",
            "--allow-weak-model", *SMALL, "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["discover", "--resume", str(out), "--no-bos"]) == 2
    assert "bos" in capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    del run["bos"]  # a run from before hap recorded it resumes BOS-less, as it started
    (out / "run.json").write_text(json.dumps(run))
    assert DiscoverConfig.from_run(out).bos is False


def test_tracr_programs_keep_their_own_bos(tmp_path, capsys):
    assert main(["discover", "--model", "tracr-reverse", "--method", "eap", "--edges", "3", "--n-examples", "8",
                 "--n-test", "8", "--no-report", "--no-bos", "--out", str(tmp_path / "r")]) == 2
    assert "tracr" in capsys.readouterr().err


# -- the full model must do the task -------------------------------------------------------------------------
def test_the_check_fires_on_a_model_that_prefers_the_wrong_answer(tiny_gpt2, tmp_path, capsys):
    """A task whose every answer is the token the model likes less: the full model gets all of it wrong."""
    path = _custom_file(tmp_path, n=24)
    task = custom_task(path, tiny_gpt2.tokenizer, 24)
    logits = answer_logits(tiny_gpt2, task.clean_ids, task.answer_positions)
    prefers_answer = task.logit_diff(logits) > 0
    lines = path.read_text().splitlines()
    wrong_way = []
    for line, right in zip(lines, prefers_answer.tolist()):
        row = json.loads(line)
        if right:  # make the model's favourite the wrong answer
            row["answer"], row["wrong"] = row["wrong"], row["answer"]
        wrong_way.append(json.dumps(row))
    weak_file = tmp_path / "weak.jsonl"
    weak_file.write_text("\n".join(wrong_way) + "\n")
    strong_file = tmp_path / "strong.jsonl"  # the same rows the model's way
    strong_file.write_text("\n".join(json.dumps({**json.loads(line), "answer": json.loads(line)["wrong"],
                                                 "wrong": json.loads(line)["answer"]}) for line in wrong_way) + "\n")
    common = ["discover", "--model", "tiny-gpt2", "--method", "eap", "--edges", "20", "--test-fraction", "0.5",
              "--n-examples", "24", "--n-test", "24", "--no-report"]
    capsys.readouterr()
    out = tmp_path / "weak-run"
    assert main([*common, "--task", str(weak_file), "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("hap: error: the full model")
    assert "accuracy 0.00" in err[0] and "BOS" in err[0] and "--allow-weak-model" in err[0]
    assert not out.exists()  # refused before the run directory is touched
    assert main([*common, "--task", str(strong_file), "--out", str(tmp_path / "strong-run")]) == 0
    assert main([*common, "--task", str(weak_file), "--out", str(out), "--allow-weak-model"]) == 0
    captured = capsys.readouterr()
    assert "studied anyway" in captured.err and "WARNING" in captured.out
    # evaluate refuses it too, and measures it when told to
    assert main(["evaluate", str(out)]) == 2
    assert "--allow-weak-model" in capsys.readouterr().err
    assert main(["evaluate", str(out), "--allow-weak-model"]) == 0
    assert main(["evaluate", str(tmp_path / "strong-run")]) == 0


def test_require_capable_model_names_causes_and_the_way_out():
    good = FullModelCheck("test", 64, 0.9, 2.0)
    chance = FullModelCheck("training", 64, 0.5, 0.3)
    negative = FullModelCheck("test", 64, 0.6, -0.1)
    assert require_capable_model([good], bos=True) == []
    for weak in (chance, negative):
        assert weak.weak
        with pytest.raises(WeakModelError, match="allow-weak-model") as raised:
            require_capable_model([good, weak], bos=False)
        assert "--bos" in str(raised.value) and "\n" not in str(raised.value)
        assert require_capable_model([good, weak], bos=False, allow_weak_model=True) == [weak]


def test_verify_reports_the_full_model_on_ioi(gemma, capsys, gemma_dir):
    report = verify_model(gemma)
    task = report["full_model_task"]
    assert report["passed"] and task["task"] == "ioi" and task["bos"] is True and task["n_examples"] == 32
    ioi = ioi_task(gemma.tokenizer, 32, seed=0)
    logits = answer_logits(gemma, ioi.clean_ids, ioi.answer_positions)
    assert task["accuracy"] == pytest.approx(float(ioi.correct(logits).float().mean()))
    assert task["weak"] == (task["accuracy"] <= 0.5 or task["logit_diff"] < 0)
    assert verify_model(gemma, bos=False)["full_model_task"]["bos"] is False
    assert main(["verify", "--model", gemma_dir, "--device", "cpu"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == describe_task_check(task) and "(BOS first)" in line
    assert ("WEAK" in line) == task["weak"]


def test_the_check_reads_the_same_numbers_from_a_task_or_its_batches(tiny_gpt2):
    from hap.batches import TaskBatches
    from hap.evaluation import check_full_model
    from hap.graph import Graph

    task = ioi_task(tiny_gpt2.tokenizer, 20, seed=3)
    logits = answer_logits(tiny_gpt2, task.clean_ids, task.answer_positions)
    direct = check_full_model(tiny_gpt2, task, n_examples=None, batch_size=6)
    assert direct.n_examples == 20
    assert direct.accuracy == pytest.approx(float(task.correct(logits).float().mean()))
    assert direct.logit_diff == pytest.approx(float(task.logit_diff(logits).mean()), abs=1e-5)
    batches = TaskBatches(tiny_gpt2, Graph.from_model(tiny_gpt2), task, 4)
    via_batches = check_full_model(tiny_gpt2, batches, n_examples=12)
    first = check_full_model(tiny_gpt2, task, n_examples=12)
    assert via_batches.n_examples == first.n_examples == 12
    assert via_batches.accuracy == pytest.approx(first.accuracy)
    assert via_batches.logit_diff == pytest.approx(first.logit_diff, abs=1e-5)


def test_the_report_and_summary_warn_of_a_weak_full_model(bos_runs, tmp_path):
    import shutil

    from hap.discovery import format_summary
    from hap.report import write_report

    run = tmp_path / "run"
    shutil.copytree(bos_runs["eap"], run)
    circuit = Circuit.load(run / "circuit.json")
    weak = {"accuracy": 0.25, "logit_diff": -1.0}
    strong = {"accuracy": 0.9, "logit_diff": 2.0}
    for full_model, warned in ((weak, True), (strong, False)):
        circuit.metrics["test"]["full_model"] = {**circuit.metrics["test"]["full_model"], **full_model}
        circuit.metrics["train"]["full_model"] = {**circuit.metrics["train"]["full_model"], **strong}
        assert ("WARNING       the full model fails the task on the test (held out) examples" in
                format_summary(circuit)) is warned
        circuit.save(run / "circuit.json")
        page = write_report(run).read_text()
        assert ('id="weak-model"' in page) is warned
