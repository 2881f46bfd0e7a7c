"""Progress of the long stages (attribution, pruning, evaluation, node importance, ACDC), in one place.

``progress_bar(...)`` returns an object with tqdm's interface as hap uses it (``update``, ``set_postfix``,
``close``, ``n``, a context manager), chosen by where the output goes:

- a terminal: tqdm's bar, redrawn in place;
- a Jupyter kernel: tqdm's widget when ipywidgets is installed, else the lines below;
- anything else (a log file, a pipe, CI): a few plain lines on stderr with the bar's numbers (stage,
  done/total, elapsed time, the postfix such as ``kl`` and ``test_kl``): one when a new tenth of the stage
  is done, at most one every ``MIN_SECONDS``; one after ``HEARTBEAT_SECONDS`` without a line (a stage
  whose total is unknown, or a slow one); and one when the stage ends. A short stage writes one line;
  no stage writes more than about eleven plus one per five minutes;
- inside ``quiet()`` (the CLI's ``--quiet``), or with ``disable=True``: nothing.

``quiet()`` is a context variable, not a global: it holds for the code run inside the ``with`` block.
``follow_terminal`` applies the same rule to transformers' own bars (``Loading weights``) while a
function runs. Light to import: tqdm and transformers are imported when a bar is made.
"""

from __future__ import annotations

import functools
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, TextIO, TypeVar

MIN_SECONDS = 10.0  # at most one line this often, however fast the tenths pass
HEARTBEAT_SECONDS = 300.0  # a line at least this often while a stage runs
UNIT_NAMES = {"ex": "examples", "step": "steps", "block": "blocks", "it": "iterations"}

_quiet: ContextVar[bool] = ContextVar("hap_progress_quiet", default=False)

Function = TypeVar("Function", bound=Callable[..., Any])


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Within the block, no progress is shown (bars, lines, ACDC's forward counts); results, warnings and
    errors still are. ``enabled=False`` leaves progress as it was."""
    token = _quiet.set(enabled or _quiet.get())
    try:
        yield
    finally:
        _quiet.reset(token)


def is_quiet() -> bool:
    return _quiet.get()


def shown(progress: bool) -> bool:
    """Whether a caller asked for ``progress`` and is not inside ``quiet()``: for progress messages that
    are not bars (e.g. ACDC's count of forwards to come)."""
    return progress and not _quiet.get()


def is_terminal(stream: TextIO | None) -> bool:
    """Whether ``stream`` is an interactive terminal (not a file, a pipe or a captured stream)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def in_notebook() -> bool:
    """Whether this code runs in a Jupyter kernel (IPython's ZMQ shell)."""
    ipython = sys.modules.get("IPython")
    shell = getattr(ipython, "get_ipython", lambda: None)() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _notebook_widgets() -> bool:
    try:
        from tqdm.notebook import IProgress  # None when ipywidgets is missing
    except ImportError:
        return False
    return IProgress is not None


def bars_shown() -> bool:
    """Whether a redrawn bar has somewhere to be drawn: stderr is a terminal, or a notebook shows widgets."""
    if _quiet.get():
        return False
    return is_terminal(sys.stderr) or (in_notebook() and _notebook_widgets())


class SilentProgress:
    """Counts like a bar and shows nothing (``disable=True``, ``quiet()``)."""

    def __init__(self, total: float | None = None, initial: float = 0) -> None:
        self.total = total
        self.n = initial

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> SilentProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LineProgress(SilentProgress):
    """A bar for logs: plain lines, few of them (see the module docstring). ``clock`` is for tests."""

    def __init__(self, total: float | None = None, desc: str = "", unit: str = "it", initial: float = 0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(total, initial)
        self.desc = desc
        self.unit = UNIT_NAMES.get(unit, unit)
        self.lines = 0  # written so far
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._started = self._last = clock()
        self._tenth = self._tenths()
        self._postfix = ""
        # A line is due. A bar with a postfix writes it at the next call (the caller's set_postfix right after
        # update), so the line carries the step's own numbers; one without writes it at once.
        self._pending = False
        self._postfixed = False
        self._closed = False
        self._shown: tuple[float, str] | None = None  # (n, postfix) of the last line

    def _tenths(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def update(self, n: float = 1) -> None:
        if self._pending:
            self._write()
        self.n += n
        now = self._clock()
        newer = self._tenths() > self._tenth and now - self._last >= MIN_SECONDS
        self._pending = newer or now - self._last >= HEARTBEAT_SECONDS
        if self._pending and not self._postfixed:
            self._write()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        values = {**(ordered_dict or {}), **kwargs}
        self._postfixed = True
        self._postfix = ", ".join(f"{key}={value}" for key, value in values.items())
        if self._pending:
            self._write()

    def close(self) -> None:
        """The stage's last line, unless the last line written already says it."""
        if not self._closed:
            self._closed = True
            if self._shown != (self.n, self._postfix):
                self._write()

    def line(self) -> str:
        """E.g. ``pruning: 36/120 steps (30%), 01:48, kl=0.002, sparsity=0.950, test_kl=0.002``."""
        done = f"{_count(self.n)}/{_count(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)" \
            if self.total else f"{_count(self.n)} {self.unit}"
        parts = [done, _clock_time(self._clock() - self._started)] + ([self._postfix] if self._postfix else [])
        return f"{self.desc}: {', '.join(parts)}"

    def _write(self) -> None:
        self._stream.write(self.line() + "\n")
        self._stream.flush()
        self.lines += 1
        self._shown = (self.n, self._postfix)
        self._last = self._clock()
        self._tenth = self._tenths()
        self._pending = False


def _count(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _clock_time(seconds: float) -> str:
    """``mm:ss``, or ``h:mm:ss`` from an hour on (tqdm's elapsed format)."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def progress_bar(total: float | None = None, desc: str = "", unit: str = "it", initial: float = 0,
                 disable: bool = False, unit_scale: bool = False) -> Any:
    """A progress display for one stage, with tqdm's interface (``update``, ``set_postfix``, ``close``,
    ``n``; a context manager): a tqdm bar on a terminal or in a notebook with widgets, ``LineProgress``
    elsewhere, ``SilentProgress`` when ``disable`` or inside ``quiet()``. Arguments as tqdm's."""
    if disable or _quiet.get():
        return SilentProgress(total, initial)
    if is_terminal(sys.stderr):
        from tqdm.std import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale)
    if in_notebook() and _notebook_widgets():
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale)
    return LineProgress(total, desc, unit, initial)


@contextmanager
def library_bars_follow_terminal() -> Iterator[None]:
    """Within the block, transformers' own bars (``Loading weights``, hub downloads) are shown only where
    hap shows bars (``bars_shown``); its setting is restored after."""
    if bars_shown():
        yield
        return
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def follow_terminal(function: Function) -> Function:
    """Decorator: ``function`` runs inside ``library_bars_follow_terminal()``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with library_bars_follow_terminal():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
