"""Readable logs: progress bars only on a terminal, a few lines per stage in a log, nothing with --quiet;
the summary prints either way."""

from __future__ import annotations

import io
import re
import sys

import pytest

from hap import progress
from hap.cli import build_parser, main
from hap.progress import LineProgress, SilentProgress, progress_bar

PROGRESS_LINE = re.compile(r"^[^:]+: [\d,]+(/[\d,]+)? \w+( \(\d+%\))?, \d+:\d\d")


class Clock:
    """A fake monotonic clock, advanced by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_pruning_like(bar: LineProgress, clock: Clock, steps: int, seconds_per_step: float) -> None:
    """Drive ``bar`` as ``hap.pruning.prune`` does: update, then the step's postfix."""
    for step in range(1, steps + 1):
        clock.now += seconds_per_step
        bar.update(1)
        bar.set_postfix({"kl": f"{1 / step:.3f}", "test_kl": f"{2 / step:.3f}"})
    bar.close()


def test_a_slow_stage_writes_a_line_per_tenth_with_the_current_postfix():
    stream, clock = io.StringIO(), Clock()
    bar = LineProgress(total=120, desc="pruning", unit="step", stream=stream, clock=clock)
    run_pruning_like(bar, clock, steps=120, seconds_per_step=3.0)  # the demo: 120 steps, ~6 minutes
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10  # 10%, 20%, ... 100%; the close adds nothing the last line did not say
    assert lines[0] == "pruning: 12/120 steps (10%), 00:36, kl=0.083, test_kl=0.167"
    assert lines[-1] == "pruning: 120/120 steps (100%), 06:00, kl=0.008, test_kl=0.017"
    assert all(PROGRESS_LINE.match(line) for line in lines)


def test_a_fast_stage_writes_one_line_and_a_slow_one_a_heartbeat():
    stream, clock = io.StringIO(), Clock()
    run_pruning_like(LineProgress(total=320, desc="fast", unit="step", stream=stream, clock=clock), clock, 320, 1 / 64)
    assert stream.getvalue().splitlines() == ["fast: 320/320 steps (100%), 00:05, kl=0.003, test_kl=0.006"]

    stream, clock = io.StringIO(), Clock()
    bar = LineProgress(total=None, desc="evaluate", unit="ex", stream=stream, clock=clock)  # total unknown
    for _ in range(40):  # 40 batches of 16, one a minute
        clock.now += 60.0
        bar.update(16)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert progress.HEARTBEAT_SECONDS == 300  # a line every 5 minutes; the last one says all the close would
    assert lines == [f"evaluate: {80 * k} examples, {5 * k:02d}:00" for k in range(1, 9)]


def test_resumed_and_early_ended_stages_say_where_they_are():
    stream, clock = io.StringIO(), Clock()
    bar = LineProgress(total=1000, desc="acdc (work: blocks computed)", unit="block", initial=400, stream=stream,
                       clock=clock)
    clock.now += 2.0
    bar.update(250)  # a sweep stopped early: ends below its total
    bar.close()
    bar.close()  # closing twice (context manager and finally) writes once
    assert stream.getvalue() == "acdc (work: blocks computed): 650/1,000 blocks (65%), 00:02\n"


def test_the_factory_picks_by_where_the_output_goes(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(total=3, desc="x"), LineProgress)
    assert type(progress_bar(total=3, desc="x", disable=True)) is SilentProgress
    with progress.quiet():
        silent = progress_bar(total=3, desc="x")
        with progress.quiet(False):  # an inner block does not undo an outer quiet
            assert progress.is_quiet()
    assert type(silent) is SilentProgress and not progress.is_quiet()
    silent.update(2)
    assert silent.n == 2  # counts like a bar (ACDC reads bar.n)
    monkeypatch.setattr(sys, "stderr", Terminal())
    from tqdm.std import tqdm

    with progress_bar(total=3, desc="x", unit="ex") as bar:
        assert isinstance(bar, tqdm)
        bar.update(3)
    assert "x: 100%" in sys.stderr.getvalue()
    with progress.quiet():
        assert type(progress_bar(total=3, desc="x")) is SilentProgress
        assert not progress.bars_shown()


def test_transformers_bars_follow_the_terminal_rule(monkeypatch):
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.enable_progress_bar()
    try:
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        with progress.library_bars_follow_terminal():
            assert not transformers_logging.is_progress_bar_enabled()
        assert transformers_logging.is_progress_bar_enabled()  # restored
        monkeypatch.setattr(sys, "stderr", Terminal())
        with progress.library_bars_follow_terminal():
            assert transformers_logging.is_progress_bar_enabled()
    finally:
        if not was_enabled:
            transformers_logging.disable_progress_bar()


def _discover(tmp_path, *extra: str) -> list[str]:
    """``hap discover`` on the tiny model with the demo's 120 steps, stdout and stderr captured (no
    terminal), as lines (a carriage return, a bar redrawing in place, counts as a line too)."""
    out, err = io.StringIO(), io.StringIO()
    argv = ["discover", "--model", "tiny-llama", "--task", "ioi", "--method", "hap", "--sparsity", "0.95",
            "--steps", "120", "--n-examples", "8", "--n-test", "8", "--batch-size", "8", "--allow-weak-model",
            "--explain-examples", "8", "--no-report", "--out", str(tmp_path / "run"), *extra]
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        assert main(argv) == 0, err.getvalue()
    finally:
        sys.stdout, sys.stderr = saved
    return re.split(r"\r|\n", (out.getvalue() + err.getvalue()).rstrip("\n"))


def test_a_discover_log_is_short_and_keeps_its_numbers(tmp_path):
    lines = _discover(tmp_path)
    stages = [line for line in lines if PROGRESS_LINE.match(line)]
    names = [line.split(":")[0] for line in stages]
    # One line per stage here; on a loaded machine a stage that outlasts the progress interval prints again,
    # its lines together and the last one its total.
    in_order = [name for i, name in enumerate(names) if i == 0 or names[i - 1] != name]
    assert in_order == ["attribution (eap-ig-inputs)", "pruning", "evaluate (test split)",
                        "evaluate (train split, in-sample)", "node importance"]
    last_pruning = [line for line in stages if line.startswith("pruning:")][-1]
    assert re.match(r"pruning: 120/120 steps \(100%\), \d\d:\d\d, kl=[\d.]+, sparsity=[\d.]+, test_kl=[\d.]+$",
                    last_pruning)
    assert len(lines) <= 40  # the bars wrote 150+ before
    assert any(line.startswith("  edges kept") for line in lines)  # the summary


def test_quiet_prints_no_progress_and_still_the_summary(tmp_path):
    lines = _discover(tmp_path, "--quiet")
    assert not [line for line in lines if PROGRESS_LINE.match(line) or "%|" in line]
    assert any(line.startswith("  edges kept") for line in lines)
    assert any(line.startswith("hap: warning: the full model fails the task") for line in lines)


@pytest.mark.parametrize("command", ["discover", "evaluate", "curve", "explain", "ensemble", "verify"])
def test_the_commands_that_show_progress_take_quiet(command):
    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.dest == "command")
    help_text = subparsers.choices[command].format_help()
    assert "--quiet" in help_text and "summary" in help_text
