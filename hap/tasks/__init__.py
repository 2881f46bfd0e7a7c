"""Tasks: clean/corrupted prompt pairs of equal token length, answer and wrong
tokens, and each task's metric, as one ``TaskData``.

``load_task`` draws examples of a built-in task from its whole vocabulary:
``"ioi"`` (Wang et al. 2022), ``"greater-than"`` (Hanna et al. 2023), a tracr
program's own inputs (``"tracr-reverse"`` or a compiled directory), or reads
the path of a ``.jsonl`` file with one ``{"clean", "corrupted", "answer",
"wrong"}`` object per line. ``task_splits`` makes the disjoint train and test
splits every circuit is fitted and judged on, and ``load_split`` rebuilds one
from its recorded ``TaskSpec``; ``validation_split`` draws fresh examples of a
built-in task's training distribution for choosing settings without the test split.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from .base import Metric, TaskData, check_n_examples, default_prefix, prompt_prefix, resolve_bos
from .custom import custom_task
from .greater_than import YearScheme, greater_than_task, year_tokens
from .ioi import ioi_task
from .program import is_program_task, program_task
from .splits import BUILT_IN as BUILT_IN_TASKS
from .splits import DEFAULT_TEST_FRACTION, TaskSpec, load_split, task_splits, validation_split


def load_task(name_or_path: str, tokenizer: PreTrainedTokenizerBase, n_examples: int, seed: int = 0,
              bos: bool | None = None) -> TaskData:
    """``n_examples`` examples of a built-in task or a custom JSONL file, tokenised by ``tokenizer``.

    ``seed`` makes the built-in tasks' random choices reproducible (a custom file
    is read in order and ignores it). ``bos``: prompts begin with the tokenizer's
    BOS token (``None``: as the tokenizer does by default; a tracr program's
    inputs always begin with their own). Raises ``DataError`` for a bad
    ``n_examples``, an unknown name, or malformed data.
    """
    check_n_examples(n_examples)
    if name_or_path == "ioi":
        return ioi_task(tokenizer, n_examples, seed, bos=bos)
    if name_or_path == "greater-than":
        return greater_than_task(tokenizer, n_examples, seed, bos=bos)
    if is_program_task(name_or_path):
        return program_task(name_or_path, n_examples, seed)
    path = Path(name_or_path)
    if path.is_file():
        return custom_task(path, tokenizer, n_examples, bos=bos)
    if path.suffix == ".jsonl" or path.exists():
        problem = "is not a file" if path.exists() else "does not exist"
        raise DataError(f"custom task file {name_or_path} {problem}; give the path of an existing .jsonl file")
    raise DataError(
        f"unknown task {name_or_path!r}: the built-in tasks are {', '.join(BUILT_IN_TASKS)} (and a tracr model's "
        "own program, tracr-<name>); "
        "a custom task is the path to a .jsonl file with one "
        '{"clean", "corrupted", "answer", "wrong"} object per line'
    )


__all__ = [
    "BUILT_IN_TASKS",
    "DEFAULT_TEST_FRACTION",
    "TaskSpec",
    "load_split",
    "task_splits",
    "validation_split",
    "Metric",
    "TaskData",
    "default_prefix",
    "prompt_prefix",
    "resolve_bos",
    "YearScheme",
    "custom_task",
    "greater_than_task",
    "ioi_task",
    "is_program_task",
    "program_task",
    "load_task",
    "year_tokens",
]
