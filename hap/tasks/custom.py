"""A task from a JSONL file: one object per line with the string fields ``clean``,
``corrupted``, ``answer`` and ``wrong``, e.g.
``{"clean": "When Mary and John left, John thanked", "corrupted": "When Anna and Kate left,
Ruth thanked", "answer": " Mary", "wrong": " John"}`` (on one line).

Every line is checked against the tokenizer that will run it: clean and corrupted
must have the same (non-zero) token length and ``answer``/``wrong`` must each be
exactly one known token. A line may also name the token positions that matter in its
clean prompt, ``"positions": {"IO": 2, "S2": -3}`` (a token index into the prompt's own
tokens, negative from the end; a BOS the tokenizer adds is not counted): the evidence of
``hap explain`` is measured there. Any problem raises one ``DataError`` naming the file,
the line, the problem and the fix. Blank lines are skipped; only the first
``n_examples`` examples are read. The metric is the logit difference answer - wrong.

A held-out split of one file hashes each example (its four fields) to a number
in [0, 1): those below ``test_fraction`` are the test split, the rest the train
split. Identical lines hash alike, so no example is ever on both sides, and the
split does not move when lines are appended.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from .base import END, TaskData, check_n_examples, encode, make_task_data, prompt_prefix

FIELDS = ("clean", "corrupted", "answer", "wrong")
EXAMPLE_LINE = '{"clean": "...", "corrupted": "...", "answer": " Mary", "wrong": " John"}'


class _DuplicateField(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateField(key)
        result[key] = value
    return result


def in_test_split(row: dict[str, str], test_fraction: float) -> bool:
    """Whether an example (its four string fields) falls in the held-out share ``test_fraction``."""
    key = json.dumps([row[field] for field in FIELDS]).encode()
    return int(hashlib.sha256(key).hexdigest()[:12], 16) / 16**12 < test_fraction


def read_rows(path: str | Path, tokenizer: PreTrainedTokenizerBase, n_examples: int,
              part: str = "all", test_fraction: float = 0.0) -> list[dict[str, Any]]:
    """The first ``n_examples`` valid examples of the file in ``part`` ("all", "train" or "test").

    Every line scanned is checked (see the module docstring); raises ``DataError``
    for a missing or unreadable file and for the first malformed line.
    """
    check_n_examples(n_examples)
    path_text = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path_text}: no such file; a custom task is a path to an existing .jsonl file") from None
    except UnicodeDecodeError as error:
        reason = f"{error.reason} at byte {error.start}"
        raise DataError(f"{path_text}: not UTF-8 text ({reason}); save it as UTF-8") from None
    except OSError as error:
        raise DataError(f"{path_text}: cannot read the file ({error.strerror})") from None

    rows: list[dict[str, Any]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if len(rows) == n_examples:
            break
        if not line.strip():
            continue
        row = _parse_line(line, f"{path_text}, line {number}", tokenizer)
        if part == "all" or (part == "test") == in_test_split(row, test_fraction):
            rows.append(row)
    return rows


def custom_task(path: str | Path, tokenizer: PreTrainedTokenizerBase, n_examples: int,
                part: str = "all", test_fraction: float = 0.0, bos: bool | None = None) -> TaskData:
    """The first ``n_examples`` examples of the JSONL file at ``path`` (all if it has fewer).

    ``bos``: prompts begin with the tokenizer's BOS (``None``: as the tokenizer does by default); the
    ``answer`` and ``wrong`` tokens are always bare.
    ``part`` "train" or "test" keeps only that side of the held-out split at
    ``test_fraction`` (module docstring); "all" reads every example. The task
    is named by ``str(path)``. Raises ``DataError`` for a missing, unreadable or
    empty file (or split) and for any malformed line.
    """
    rows = read_rows(path, tokenizer, n_examples, part, test_fraction)
    if not rows:
        if part != "all":
            raise DataError(
                f"{path}: no example falls in the {part} split (held-out fraction {test_fraction}); add examples, "
                "change --test-fraction, or give the test examples in their own file with --test-task FILE"
            )
        raise DataError(
            f"{path} has no examples (the file is empty or only blank lines); "
            f"write one JSON object per line, e.g. {EXAMPLE_LINE}"
        )
    data = make_task_data(
        str(path),
        tokenizer,
        [row["clean"] for row in rows],
        [row["corrupted"] for row in rows],
        [encode(tokenizer, row["answer"])[0] for row in rows],
        [encode(tokenizer, row["wrong"])[0] for row in rows],
        bos=bos,
    )
    labels = sorted({label for row in rows for label in row.get("positions", {})})
    if not labels:
        return data
    offset = len(prompt_prefix(tokenizer, bos))
    named = {label: torch.tensor([_token_index(row, label, tokenizer, offset) for row in rows]) for label in labels}
    return replace(data, named_positions=named)


def _token_index(row: dict[str, Any], label: str, tokenizer: PreTrainedTokenizerBase, offset: int) -> int:
    """The position of ``row``'s named token ``label`` in its ids (-1: the row does not name it)."""
    index = row.get("positions", {}).get(label)
    if index is None:
        return -1
    return offset + (index if index >= 0 else len(encode(tokenizer, row["clean"])) + index)


def _parse_line(line: str, where: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Validate one non-blank line; ``where`` is "<file>, line <n>" for the messages."""
    try:
        row = json.loads(line, object_pairs_hook=_reject_duplicates)
    except _DuplicateField as duplicate:
        message = f"field {duplicate.key!r} appears more than once in the object; keep only one"
        raise DataError(f"{where}: {message}") from None
    except json.JSONDecodeError as error:
        raise DataError(
            f"{where}: invalid JSON ({error.msg} at column {error.colno}); "
            f"write one JSON object per line, e.g. {EXAMPLE_LINE}"
        ) from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; write e.g. {EXAMPLE_LINE}")
    missing = [field for field in FIELDS if field not in row]
    if missing:
        raise DataError(
            f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
            f"every line needs the string fields {', '.join(FIELDS)}"
        )
    for field in FIELDS:
        if not isinstance(row[field], str):
            raise DataError(
                f"{where}: field {field!r} must be a string, got {type(row[field]).__name__} "
                f"({json.dumps(row[field])}); put the value in double quotes"
            )

    clean, corrupted = encode(tokenizer, row["clean"]), encode(tokenizer, row["corrupted"])
    if not clean:
        raise DataError(f"{where}: the clean prompt is empty (0 tokens); write the prompt that precedes the answer")
    if len(clean) != len(corrupted):
        raise DataError(
            f"{where}: the clean prompt is {len(clean)} tokens but the corrupted prompt is {len(corrupted)} tokens; "
            "make them the same token length (e.g. swap words for words of the same token count)"
        )
    for field in ("answer", "wrong"):
        ids = encode(tokenizer, row[field])
        if len(ids) != 1:
            pieces = ", ".join(repr(tokenizer.decode([i])) for i in ids)
            raise DataError(
                f"{where}: {field} {row[field]!r} is {len(ids)} tokens ({pieces or 'none'}); it must be exactly one "
                "token: use a single word, usually with a leading space, e.g. \" Mary\""
            )
        if tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id:
            raise DataError(
                f"{where}: {field} {row[field]!r} is the unknown token {tokenizer.unk_token!r} of this tokenizer; "
                "use a word in its vocabulary"
            )
    parsed: dict[str, Any] = {field: row[field] for field in FIELDS}
    if "positions" in row:
        parsed["positions"] = _parse_positions(row["positions"], len(clean), where)
    return parsed


def _parse_positions(positions: Any, length: int, where: str) -> dict[str, int]:
    """A line's ``positions``: names -> token indices of its clean prompt (``length`` tokens)."""
    example = '"positions": {"IO": 2, "S2": -3}'
    if not isinstance(positions, dict) or not positions:
        raise DataError(f"{where}: positions must be a non-empty object of names and token indices, e.g. {example}")
    for label, index in positions.items():
        if label == END:
            raise DataError(f"{where}: the position name {END!r} is taken (the answer position, always named); "
                            "call yours otherwise")
        if isinstance(index, bool) or not isinstance(index, int) or not -length <= index < length:
            raise DataError(f"{where}: position {label!r} is {json.dumps(index)}; it must be a whole number from "
                            f"{-length} to {length - 1} (a token index into the clean prompt's {length} tokens)")
    return dict(positions)
