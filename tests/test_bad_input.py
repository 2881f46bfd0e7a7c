"""Every mistake a user can make at the command line: exit 2, exactly one line on stderr that starts
``hap: error:``, and nothing on disk changed."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from hap.cli import main

TINY = ["--model", "tiny-gpt2", "--device", "cpu"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash (an absent folder is an empty snapshot)."""
    if not folder.exists():
        return {}
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def refuse(argv: list[str], capsys, watched: Path, *words: str) -> str:
    """Run ``argv``; assert exit 2, one ``hap: error:`` line naming ``words``, and ``watched`` unchanged."""
    before = snapshot(watched)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse exits on its own errors
        code = stop.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("hap: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert snapshot(watched) == before
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run to resume, evaluate and corrupt copies of."""
    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(["discover", *TINY, "--allow-weak-model", "--method", "eap", "--edges", "20", "--n-examples", "4", "--n-test", "4",
                 "--out", str(out), "--no-report"]) == 0
    return out


def _task_file(tmp_path: Path, rows: list[dict] | str) -> Path:
    path = tmp_path / "task.jsonl"
    path.write_text(rows if isinstance(rows, str) else "\n".join(json.dumps(row) for row in rows))
    return path


GOOD_ROW = {"clean": "When Mary and John went to the store, John gave a drink to",
            "corrupted": "When Mary and John went to the store, Mary gave a drink to",
            "answer": " Mary", "wrong": " John"}

DISCOVER_MISTAKES = [
    (["--method", "nope", "--edges", "5"], ["--method", "nope"]),
    (["--sparsity", "1.5"], ["--sparsity"]),
    (["--edges", "0"], ["--edges"]),
    (["--edges", "5", "--sparsity", "0.5"], ["--sparsity"]),
    ([], ["--edges N"]),
    (["--edges", "5", "--n-examples", "0"], ["--n-examples"]),
    (["--edges", "5", "--n-test", "0"], ["--n-test"]),
    (["--edges", "5", "--batch-size", "0"], ["--batch-size"]),
    (["--edges", "5", "--test-fraction", "1.5"], ["--test-fraction"]),
    (["--edges", "5", "--dtype", "float8"], ["float8"]),
    (["--edges", "5", "--device", "cuda:7"], ["cuda"]),
    (["--edges", "100000"], ["100000"]),
    (["--edges", "5", "--task", "nope"], ["nope"]),
    (["--edges", "5", "--task", "missing.jsonl"], ["missing.jsonl"]),
    (["--method", "acdc", "--threshold", "-1"], ["--threshold"]),
    (["--method", "acdc", "--edges", "5", "--threshold-tolerance", "-0.1"], ["--threshold-tolerance"]),
    (["--method", "acdc", "--edges", "5", "--threshold-start", "2"], ["--threshold-start", "between 1e-05 and 1"]),
    (["--method", "acdc", "--edges", "5", "--threshold", "0.1", "--threshold-start", "0.01"],
     ["--threshold-start", "without --threshold"]),
    (["--method", "hap", "--sparsity", "0.5", "--candidates", "0.01"], ["--candidates"]),
    (["--method", "ep", "--edges", "5", "--steps", "0"], ["--steps"]),
    (["--method", "ep", "--edges", "5", "--readoff-every", "-1"], ["--readoff-every", "0 (never)"]),
    (["--edges", "5", "--steps", "many"], ["--steps"]),
    (["--edges", "5", "--ground-truth", "missing.json"], ["missing.json"]),
]


@pytest.mark.parametrize("extra, words", DISCOVER_MISTAKES, ids=[" ".join(m[0]) or "no size" for m in DISCOVER_MISTAKES])
def test_discover_mistakes(tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    refuse(["discover", *TINY, "--allow-weak-model", "--out", str(out), *extra], capsys, tmp_path, *words)
    assert not out.exists()  # nothing left behind: the corrected command just works


@pytest.mark.parametrize("rows, words", [
    ("", ["no example"]),
    ("{not json", ["line 1"]),
    ([{**GOOD_ROW, "corrupted": "When Mary and John went to the store"}], ["line 1", "tokens"]),
    ([{**GOOD_ROW, "answer": " Mary Mary"}], ["one token"]),
    ([{k: v for k, v in GOOD_ROW.items() if k != "wrong"}], ["wrong"]),
])
def test_bad_task_files(tmp_path, capsys, rows, words):
    task = _task_file(tmp_path, rows)
    refuse(["discover", *TINY, "--allow-weak-model", "--edges", "5", "--task", str(task), "--out", str(tmp_path / "run")], capsys,
           tmp_path, *words)


def test_an_unknown_model_is_refused_with_the_closest_name(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refuse(["discover", "--model", "tiny-gtp2", "--edges", "5", "--out", str(tmp_path / "r")], capsys, tmp_path,
           "tiny-gtp2", "did you mean 'tiny-gpt2'")
    refuse(["verify", "--model", str(tmp_path / "no-such-dir")], capsys, tmp_path, "no-such-dir")


def test_run_directory_mistakes(tmp_path, capsys, finished):
    refuse(["discover", *TINY, "--allow-weak-model", "--method", "eap", "--edges", "20", "--out", str(finished)], capsys, finished,
           "already holds a run", "--force")
    refuse(["discover", "--resume", str(tmp_path / "empty")], capsys, tmp_path, "nothing to resume")
    refuse(["discover", "--resume", str(finished), "--edges", "30"], capsys, finished, "other settings", "edges")
    refuse(["discover", "--resume", str(finished), "--out", str(tmp_path / "elsewhere")], capsys, tmp_path, "--out")


def _broken_copy(finished: Path, tmp_path: Path, change) -> Path:
    copy = Path(shutil.copytree(finished, tmp_path / "copy"))
    path = copy / "circuit.json"
    document = json.loads(path.read_text())
    path.write_text(change(document) if callable(change) else change)
    return copy


@pytest.mark.parametrize("change, words", [
    ("", ["circuit.json"]),
    ('{"format": "hap-circuit/2", "model": "tiny-gpt2"', ["circuit.json"]),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "graph"}), ["graph"]),
    (lambda d: json.dumps({k: v for k, v in d.items() if k != "edges"}), ["edges"]),
    (lambda d: json.dumps({**d, "format": "hap-circuit/9"}), ["hap-circuit/9"]),
    (lambda d: json.dumps({**d, "edges": 5}), ["edges"]),
    (lambda d: json.dumps({**d, "model": "tiny-llama"}), ["tiny-llama", "layers"]),
])
def test_broken_circuit_files(tmp_path, capsys, finished, change, words):
    copy = _broken_copy(finished, tmp_path, change)
    refuse(["evaluate", str(copy)], capsys, copy, *words)


def test_evaluate_and_curve_mistakes(tmp_path, capsys, finished):
    refuse(["evaluate", str(tmp_path / "missing.json")], capsys, tmp_path, "missing.json")
    refuse(["curve", str(tmp_path / "missing")], capsys, tmp_path, "missing")
    truth = tmp_path / "truth.json"
    truth.write_text(json.dumps(["a9.h0->m0"]))
    refuse(["evaluate", str(finished), "--ground-truth", str(truth)], capsys, finished, "a9.h0->m0")
    truth.write_text("[not json")
    refuse(["evaluate", str(finished), "--ground-truth", str(truth)], capsys, finished, "truth.json")
    refuse(["evaluate", str(finished), "--split", "dev"], capsys, finished, "--split")


def test_other_commands_mistakes(tmp_path, capsys, finished):
    refuse(["ensemble", str(finished), "--edges", "5", "--out", str(tmp_path / "e")], capsys, tmp_path, "two runs")
    refuse(["ensemble", str(finished), str(finished), "--edges", "5"], capsys, tmp_path, "--out")
    refuse(["report", str(tmp_path / "nothing-here")], capsys, tmp_path, "nothing-here")
    refuse(["export", str(finished), "--format", "png", "--out", str(tmp_path / "x")], capsys, tmp_path, "png")
    refuse(["nonsense"], capsys, tmp_path, "nonsense")


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "ep"
    assert main(["discover", *TINY, "--allow-weak-model", "--method", "ep", "--edges", "20", "--steps", "6", "--n-examples", "4",
                 "--n-test", "4", "--checkpoint-every", "2", "--out", str(out), "--no-report"]) == 0
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:100])  # truncated
    refuse(["discover", "--resume", str(out)], capsys, out, "checkpoint.pt", "damaged")


def test_sigkill_while_checkpointing_then_resume_continues_from_the_last_good_one(tmp_path):
    """Kill an Edge Pruning run (a checkpoint every step, so likely mid-write) with SIGKILL, then --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ep"
    argv = [sys.executable, "-m", "hap", "discover", *TINY, "--allow-weak-model", "--method", "ep", "--edges", "20", "--steps", "400",
            "--n-examples", "8", "--n-test", "4", "--checkpoint-every", "1", "--out", str(out), "--no-report"]
    run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    assert run.poll() is None, "the run ended before it could be killed; give it more steps"
    run.send_signal(signal.SIGKILL)
    run.wait()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    assert 0 < len(log) < 400
    assert main(["discover", "--resume", str(out)]) == 0
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] >= 400  # every step once, none lost or doubled
    assert json.loads((out / "circuit.json").read_text())["method"] == "ep"


def test_sigterm_ends_a_run_as_ctrl_c_does_and_it_resumes(tmp_path):
    """A job scheduler's SIGTERM: the run writes its checkpoint (none was due), says so, exits 130; --resume
    goes on from the step it reached."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ep"
    argv = [sys.executable, "-m", "hap", "discover", *TINY, "--allow-weak-model", "--method", "ep", "--edges", "20", "--steps", "400",
            "--n-examples", "8", "--n-test", "4", "--checkpoint-every", "100000", "--out", str(out), "--no-report"]
    run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3) and time.monotonic() < deadline \
            and run.poll() is None:
        time.sleep(0.05)
    assert run.poll() is None and not (out / "checkpoint.pt").exists()
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130 and "hap: interrupted" in stderr
    assert (out / "checkpoint.pt").exists()  # written on the way out
    reached = len(log.read_text().splitlines())
    assert 3 <= reached < 400
    assert main(["discover", "--resume", str(out)]) == 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] >= 400


def test_damaged_run_settings_and_attribution_cache_are_refused_in_one_line(tmp_path, capsys, finished):
    copy = Path(shutil.copytree(finished, tmp_path / "copy"))
    (copy / "run.json").write_text('{"model": ')
    refuse(["discover", "--resume", str(copy)], capsys, copy, "run.json", "damaged")
    out = tmp_path / "hap"
    assert main(["discover", *TINY, "--allow-weak-model", "--method", "hap", "--edges", "20", "--steps", "4", "--n-examples", "4",
                 "--n-test", "4", "--out", str(out), "--no-report"]) == 0
    (out / "attribution.pt").write_bytes(b"not a tensor")
    refuse(["discover", "--resume", str(out)], capsys, out, "attribution.pt", "damaged")
