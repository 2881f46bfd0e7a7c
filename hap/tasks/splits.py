"""Train and test splits of a task, and the record that rebuilds each one.

A circuit is judged on examples it was not fitted on. For the built-in
generators the test split differs from the training split in its random draw
*and* in its vocabulary: every fourth template and every fourth name (IOI), or
every fourth template, noun and century (greater-than), is held out, so test
prompts are phrased and filled in ways no training prompt is. A custom file is
split by hashing its examples (``test_fraction``), or the test examples come
from a file of their own (``test_task``); either way no example is on both
sides. A tracr program's task (``hap.tasks.program``) hashes its clean input
sequences the same way.

``TaskSpec`` is what ``circuit.json`` records under ``splits``: enough to
rebuild exactly the same examples with ``load_split``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from ..settings import DEFAULT_TEST_FRACTION
from . import greater_than, ioi
from .base import TaskData, check_n_examples, resolve_bos, single_token_words
from .custom import FIELDS, custom_task, read_rows
from .program import is_program_task, program_task

BUILT_IN = ("ioi", "greater-than")
HELD_OUT_EVERY = 4  # every fourth template / name / noun / century is held out for the test split
SPLITS = ("train", "test", "all")
# The vocabulary lists whose every fourth entry is held out; the others are shared by both splits.
HELD_OUT_LISTS = {"ioi": ("templates", "names"), "greater-than": ("templates", "nouns", "centuries")}


@dataclass(frozen=True)
class TaskSpec:
    """Exactly which examples one split holds.

    ``task``: "ioi", "greater-than", a tracr program (``tracr-reverse`` or its
    directory) or the path of a .jsonl file; ``split``:
    "train", "test" or "all"; ``seed`` draws the built-in generators' examples
    from ``vocabulary`` (their template, name, ... lists); a file's ``split``
    side is the hash rule at ``test_fraction`` (None: the whole file) and
    ``sha256`` is the file's content hash when the split was made. ``bos``:
    whether the prompts began with the tokenizer's BOS token; ``None`` in a
    file written before hap recorded it, whose prompts had none (and for a
    tracr program, whose inputs always begin with their own BOS).
    """

    task: str
    split: str
    n_examples: int
    seed: int = 0
    vocabulary: dict[str, list[str]] | None = None
    test_fraction: float | None = None
    sha256: str | None = None
    bos: bool | None = None

    def __post_init__(self) -> None:
        check_n_examples(self.n_examples)
        if self.split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")

    @property
    def is_file(self) -> bool:
        return self.task not in BUILT_IN and not self.is_program

    @property
    def is_program(self) -> bool:
        return is_program_task(self.task)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any, source: str = "split") -> TaskSpec:
        """Read a recorded spec; ``DataError`` naming ``source`` if a field is missing or ill-typed."""
        if not isinstance(values, dict):
            raise DataError(f"{source}: expected an object with the fields task, split, n_examples, seed")
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("task", "split", "n_examples") if name not in values]
        if missing:
            raise DataError(f"{source}: missing {', '.join(missing)}")
        vocabulary = values.get("vocabulary")
        if values.get("bos") is not None and not isinstance(values["bos"], bool):
            raise DataError(f"{source}: bos must be true, false or null")
        if vocabulary is not None and not (
            isinstance(vocabulary, dict)
            and all(isinstance(v, list) and all(isinstance(w, str) for w in v) for v in vocabulary.values())
        ):
            raise DataError(f"{source}: vocabulary must map names to lists of strings")
        try:
            return cls(**{key: value for key, value in values.items() if key in known})
        except TypeError as error:
            raise DataError(f"{source}: {error}") from None

    def describe(self) -> str:
        """One line for summaries and reports, e.g. "test split: 200 examples (seed 1); 8 templates, 21 names
        held out of training" (and "; BOS first" when the prompts begin with the BOS token)."""
        return self._describe() + ("; BOS first" if self.bos else "")

    def _describe(self) -> str:
        if self.is_program:
            return (f"{self.split} split: {self.n_examples} (input, position) examples of {self.task} (seed "
                    f"{self.seed}; inputs hashed {self.test_fraction:g} test / rest train)")
        if self.is_file:
            side = "the whole file" if self.test_fraction is None else \
                f"the {self.split} side of a {self.test_fraction:g} held-out hash split"
            return f"{self.split} split: {self.n_examples} examples of {self.task} ({side})"
        vocabulary = self.vocabulary or {}
        held = [name for name in HELD_OUT_LISTS.get(self.task, ()) if name in vocabulary]
        lists = ", ".join(f"{len(vocabulary[name])} {name}" for name in held)
        if self.split == "test":
            lists += " held out of training"
        elif self.split == "train":
            lists += " (the test split holds out others)"
        return f"{self.split} split: {self.n_examples} examples (seed {self.seed}); {lists}"


def _held_out(words: list[str], test: bool) -> list[str]:
    return [word for i, word in enumerate(words) if (i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1) == test]


def _vocabularies(task: str, tokenizer: PreTrainedTokenizerBase) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(train, test) vocabularies of a built-in generator: disjoint templates and names (nouns, centuries)."""
    if task == "ioi":
        lists = {"templates": list(ioi.TEMPLATES), "names": single_token_words(tokenizer, ioi.NAMES),
                 "places": list(ioi.PLACES), "objects": list(ioi.OBJECTS)}
    else:
        lists = {"templates": list(greater_than.TEMPLATES), "nouns": list(greater_than.NOUNS),
                 "centuries": list(greater_than.CENTURIES)}
    held = HELD_OUT_LISTS[task]
    train = {name: _held_out(words, False) if name in held else words for name, words in lists.items()}
    test = {name: _held_out(words, True) if name in held else words for name, words in lists.items()}
    return train, test


def file_sha256(path: str | Path) -> str:
    """The content hash recorded with a file's split (so a changed file is noticed)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror}); give the path of a .jsonl file") from None


def task_splits(
    task: str,
    tokenizer: PreTrainedTokenizerBase,
    n_train: int,
    n_test: int,
    seed: int = 0,
    test_task: str | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    bos: bool | None = None,
) -> tuple[TaskSpec, TaskSpec]:
    """The (train, test) specs of a task; nothing is tokenised beyond the name filter.

    ``bos``: whether prompts begin with the tokenizer's BOS token (``None``: as the tokenizer does by
    default); both specs record the answer, so ``load_split`` rebuilds the same ids.
    Built-in tasks: the training split draws ``n_train`` examples with ``seed``
    from three quarters of the templates and names (nouns, centuries), the test
    split ``n_test`` with ``seed + 1`` from the held-out quarter. A file: with
    ``test_task`` that file is the test split (``DataError`` if it shares an
    example with ``task``); otherwise the file's examples are hashed into
    ``test_fraction`` test and the rest train.
    """
    check_n_examples(n_train)
    check_n_examples(n_test)
    if is_program_task(task):
        if test_task is not None:
            raise DataError(f"{task} draws its test split from the program itself; drop --test-task")
        if bos is not None:
            raise DataError(f"{task}: a tracr program's inputs always begin with its own BOS; drop --bos/--no-bos")
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"--test-fraction must be in (0, 1), got {test_fraction}")
        return (TaskSpec(task, "train", n_train, seed, None, test_fraction),
                TaskSpec(task, "test", n_test, seed + 1, None, test_fraction))
    train, test = _task_splits(task, tokenizer, n_train, n_test, seed, test_task, test_fraction)
    begins = resolve_bos(tokenizer, bos)
    return replace(train, bos=begins), replace(test, bos=begins)


def _task_splits(task: str, tokenizer: PreTrainedTokenizerBase, n_train: int, n_test: int, seed: int,
                 test_task: str | None, test_fraction: float) -> tuple[TaskSpec, TaskSpec]:
    if task in BUILT_IN:
        if test_task is not None:
            train_vocabulary, _ = _vocabularies(task, tokenizer)
            train = TaskSpec(task, "train", n_train, seed, train_vocabulary)
            return train, _file_spec(test_task, "all", n_test, None)
        train_vocabulary, test_vocabulary = _vocabularies(task, tokenizer)
        return (TaskSpec(task, "train", n_train, seed, train_vocabulary),
                TaskSpec(task, "test", n_test, seed + 1, test_vocabulary))
    if test_task is not None:
        train, test = _file_spec(task, "all", n_train, None), _file_spec(test_task, "all", n_test, None)
        _check_disjoint(train, test, tokenizer)
        return train, test
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    return _file_spec(task, "train", n_train, test_fraction), _file_spec(task, "test", n_test, test_fraction)


def _file_spec(path: str, split: str, n_examples: int, test_fraction: float | None) -> TaskSpec:
    if not Path(path).is_file():
        problem = "is not a file" if Path(path).exists() else "does not exist"
        raise DataError(f"task file {path} {problem}; give the path of an existing .jsonl file")
    return TaskSpec(path, split, n_examples, 0, None, test_fraction, file_sha256(path))


def _check_disjoint(train: TaskSpec, test: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> None:
    train_rows = read_rows(train.task, tokenizer, train.n_examples)
    seen = {json.dumps([row[f] for f in FIELDS]) for row in train_rows}
    for row in read_rows(test.task, tokenizer, test.n_examples):
        if json.dumps([row[f] for f in FIELDS]) in seen:
            raise DataError(
                f"the test file {test.task} repeats a training example of {train.task} (clean prompt "
                f"{row['clean']!r}); held-out numbers need disjoint files: remove it from one of them"
            )


def load_split(spec: TaskSpec, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    """The examples a spec describes, tokenised by ``tokenizer`` (the same ones every time): with the BOS
    token first exactly when the spec says so (a spec that records nothing had none)."""
    bos = bool(spec.bos)
    if spec.task == "ioi":
        return ioi.ioi_task(tokenizer, spec.n_examples, spec.seed, **(spec.vocabulary or {}), bos=bos)
    if spec.task == "greater-than":
        return greater_than.greater_than_task(tokenizer, spec.n_examples, spec.seed, **(spec.vocabulary or {}),
                                              bos=bos)
    if spec.is_program:
        return program_task(spec.task, spec.n_examples, spec.seed, spec.split, spec.test_fraction)
    if spec.sha256 is not None and Path(spec.task).is_file() and file_sha256(spec.task) != spec.sha256:
        raise DataError(
            f"{spec.task} has changed since this split was recorded (its sha256 differs), so its {spec.split} "
            "split cannot be rebuilt; restore the file, or evaluate on it anyway with --task FILE"
        )
    if spec.test_fraction is None:
        return custom_task(spec.task, tokenizer, spec.n_examples, bos=bos)
    return custom_task(spec.task, tokenizer, spec.n_examples, spec.split, spec.test_fraction, bos=bos)


VALIDATION_SEED_OFFSET = 7919  # a validation draw's seed: the training seed plus this (no split's seed is near it)


def validation_split(train: TaskSpec, tokenizer: PreTrainedTokenizerBase, n_examples: int) -> TaskData:
    """``n_examples`` fresh examples of a built-in task's training distribution that the training split does not hold.

    Drawn from the training vocabulary with seed ``train.seed + VALIDATION_SEED_OFFSET``; prompts the
    training split holds are dropped. For choosing settings (a step budget, a margin) without reading the
    test split, whose vocabulary is held out of both. A file's or a program's task has no fresh draws:
    ``DataError``.
    """
    check_n_examples(n_examples)
    if train.task not in BUILT_IN or train.split != "train":
        raise DataError(f"{train.task} ({train.split} split): a validation split is drawn afresh from a built-in "
                        f"task's training split ({', '.join(BUILT_IN)}); for a file, hold examples out of it "
                        "with --test-task or --test-fraction instead")
    seen = set(load_split(train, tokenizer).clean_prompts)
    draw = load_split(replace(train, seed=train.seed + VALIDATION_SEED_OFFSET, n_examples=2 * n_examples), tokenizer)
    fresh = [i for i, prompt in enumerate(draw.clean_prompts) if prompt not in seen][:n_examples]
    if len(fresh) < n_examples:
        raise DataError(f"{train.task}: only {len(fresh)} of {2 * n_examples} fresh draws differ from the "
                        f"{train.n_examples} training examples; ask for fewer validation examples")
    return draw.select(fresh)


def with_examples(spec: TaskSpec, n_examples: int) -> TaskSpec:
    """The same split with another number of examples (the first ``n_examples`` of the same draw)."""
    return replace(spec, n_examples=n_examples)

