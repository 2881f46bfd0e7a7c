"""Greater-than (Hanna et al. 2023): "The war lasted from the year 1745 to the
year 17" -> a year after 1745. The corrupted prompt uses the start year C01 of
the same century C (1701 here).

The generator takes its vocabulary (templates, nouns, centuries) as arguments,
so a held-out split can use ones the training split never sees
(``hap.tasks.splits``); every fourth of each list is the held-out quarter.

Tokenizers split years differently, so the scheme is detected from the tokenizer:

- ``TWO_DIGIT`` (GPT-2): "1745" is "17" + "45". The answer is the two-digit
  token; good = suffix tokens > YY, bad = suffix tokens <= YY. Only YY whose year
  splits this way are used; answer = the next valid suffix above YY, wrong = YY.
- ``DIGIT`` (SmolLM2, Llama): every digit is a token, so the model predicts the
  tens digit. Good = tens digits > tens(YY) (the year is then surely greater),
  bad = tens digits < tens(YY); the equal tens digit is ambiguous and in
  neither set. YY is drawn from 10..89 so both sets are non-empty; answer =
  tens(YY) + 1, wrong = tens(YY) - 1.
- ``SPACED`` (the word-level tiny tokenizer, which has the words "17" and
  "00".."99" but no "1745"): the year is written "17 45", so the prompt ends
  "to the year 17" and the answer is the word " YY"; sets as for ``TWO_DIGIT``.

Otherwise YY is drawn from 02..98. The scheme is detected on the century 17;
another century is used only if the tokenizer splits its years the same way
(same tokens after the century), which ``DataError`` reports otherwise. The metric is softmax mass on good tokens minus
mass on bad tokens at the answer position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from enum import Enum
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from .base import Metric, TaskData, check_n_examples, encode, make_task_data, prompt_prefix

CENTURY = "17"  # the century the tokenizer's year scheme is detected on
CORRUPTED_YY = 1

# {START} is the full start year ("1745", or "17 45" for SPACED); the prompt ends at the century.
TEMPLATES: tuple[str, ...] = (
    "The {NOUN} lasted from the year {START} to the year {CENTURY}",
    "The {NOUN} started in the year {START} and ended in the year {CENTURY}",
    "The {NOUN} began in the year {START} and lasted until the year {CENTURY}",
    "The {NOUN} lasted from {START} to {CENTURY}",
    "The {NOUN} went on from the year {START} to the year {CENTURY}",
    "The {NOUN} ran from {START} until {CENTURY}",
    "The {NOUN} took place between the year {START} and the year {CENTURY}",
    "The {NOUN} was in force from the year {START} until the year {CENTURY}",
)
NOUNS: tuple[str, ...] = (
    "war", "expedition", "conflict", "reign", "treaty", "contract", "deal", "peace",
    "campaign", "siege", "journey", "rebellion", "alliance", "dynasty", "famine", "voyage",
)  # fmt: skip
CENTURIES: tuple[str, ...] = ("11", "12", "13", "14", "15", "16", "17", "18")

PROBE = "The war lasted from the year " + CENTURY


class YearScheme(Enum):
    """How the tokenizer splits a year such as 1745 (see the module docstring)."""

    TWO_DIGIT = "two-digit"
    DIGIT = "digit"
    SPACED = "spaced"


@dataclass(frozen=True)
class YearTokens:
    """A tokenizer's year scheme: ``tokens`` maps a two-digit suffix YY (TWO_DIGIT,
    SPACED) or a digit 0..9 (DIGIT) to the token predicted after the century."""

    scheme: YearScheme
    tokens: dict[int, int]

    @property
    def separator(self) -> str:
        return " " if self.scheme is YearScheme.SPACED else ""

    def start_values(self) -> list[int]:
        """The YY that can start a clean prompt: both good and bad sets non-empty."""
        if self.scheme is YearScheme.DIGIT:
            return list(range(10, 90))
        return [yy for yy in self.tokens if 2 <= yy <= 98 and any(other > yy for other in self.tokens)]


def year_tokens(tokenizer: PreTrainedTokenizerBase) -> YearTokens:
    """Detect how ``tokenizer`` splits years after the century "17"; ``DataError`` if no scheme fits."""
    base = encode(tokenizer, PROBE)
    unk = tokenizer.unk_token_id

    def continuation(text: str) -> list[int] | None:
        ids = encode(tokenizer, PROBE + text)
        if ids[: len(base)] != base or unk in ids[len(base) :]:
            return None
        return ids[len(base) :]

    def pairs(separator: str) -> dict[int, int]:
        found = {}
        for yy in range(100):
            ids = continuation(f"{separator}{yy:02d}")
            if ids is not None and len(ids) == 1:
                found[yy] = ids[0]
        return found

    for scheme, separator in ((YearScheme.TWO_DIGIT, ""), (YearScheme.SPACED, " ")):
        found = pairs(separator)
        candidate = YearTokens(scheme, found)
        if CORRUPTED_YY in found and len(candidate.start_values()) >= 10:
            return candidate

    digits = {}
    for d in range(10):
        ids = continuation(str(d))
        if ids is not None and len(ids) == 1:
            digits[d] = ids[0]
    if len(digits) == 10 and all(
        continuation(f"{yy:02d}") == [digits[yy // 10], digits[yy % 10]] for yy in range(100)
    ):
        return YearTokens(YearScheme.DIGIT, digits)

    raise DataError(
        "greater-than: this tokenizer splits years in none of the supported ways (\"1745\" as \"17\"+\"45\", "
        "as single digits, or \"17 45\" with the words 00..99 in the vocabulary); use a custom .jsonl task instead"
    )


def greater_than_task(
    tokenizer: PreTrainedTokenizerBase,
    n_examples: int,
    seed: int = 0,
    templates: Sequence[str] = TEMPLATES,
    nouns: Sequence[str] = NOUNS,
    centuries: Sequence[str] = CENTURIES,
    bos: bool | None = None,
) -> TaskData:
    """``n_examples`` greater-than prompts (corruption: start year C01), reproducible from ``seed``.

    ``bos``: prompts begin with the tokenizer's BOS (``None``: as the tokenizer does by default).
    The returned ``TaskData`` uses ``Metric.PROB_DIFF``: ``candidate_ids`` [C] are
    the year tokens of the detected scheme, ``good_mask``/``bad_mask`` [N, C] the
    per-example good and bad sets. Raises ``DataError`` for an empty vocabulary
    or a century whose years this tokenizer splits differently.
    """
    check_n_examples(n_examples)
    if not templates or not nouns or not centuries:
        raise DataError("greater-than: templates, nouns and centuries must each be non-empty")
    years = year_tokens(tokenizer)
    starts = years.start_values()
    for century in centuries:
        _check_century(tokenizer, years, century, starts)
    values = sorted(years.tokens)  # candidate order: the suffixes (or digits) ascending
    candidate_ids = torch.tensor([years.tokens[v] for v in values], dtype=torch.long)

    rng = random.Random(seed)
    prefix = prompt_prefix(tokenizer, bos)
    digits = 2 if years.scheme is YearScheme.DIGIT else 1  # tokens of the start year after its century
    year_ends: list[int] = []  # per example: the position of the start year's last token
    clean_prompts: list[str] = []
    corrupted_prompts: list[str] = []
    answers: list[int] = []
    wrongs: list[int] = []
    good_rows: list[list[bool]] = []
    bad_rows: list[list[bool]] = []
    for _ in range(n_examples):
        template, noun, yy = rng.choice(list(templates)), rng.choice(list(nouns)), rng.choice(starts)
        century = rng.choice(list(centuries))
        clean_prompts.append(_prompt(template, noun, century, yy, years.separator))
        start_text = clean_prompts[-1][: clean_prompts[-1].index(f"{century}{years.separator}{yy:02d}")]
        year_ends.append(len(prefix) + len(encode(tokenizer, start_text + f"{century}{years.separator}{yy:02d}")) - 1)
        corrupted_prompts.append(_prompt(template, noun, century, CORRUPTED_YY, years.separator))
        if years.scheme is YearScheme.DIGIT:
            tens = yy // 10
            good_rows.append([v > tens for v in values])
            bad_rows.append([v < tens for v in values])
            answers.append(years.tokens[tens + 1])
            wrongs.append(years.tokens[tens - 1])
        else:
            good_rows.append([v > yy for v in values])
            bad_rows.append([v <= yy for v in values])
            answers.append(years.tokens[min(v for v in values if v > yy)])
            wrongs.append(years.tokens[yy])
    data = make_task_data(
        "greater-than",
        tokenizer,
        clean_prompts,
        corrupted_prompts,
        answers,
        wrongs,
        bos=bos,
        metric=Metric.PROB_DIFF,
        candidate_ids=candidate_ids,
        good_mask=torch.tensor(good_rows, dtype=torch.bool),
        bad_mask=torch.tensor(bad_rows, dtype=torch.bool),
    )
    ends = torch.tensor(year_ends, dtype=torch.long)
    named = {"YY": ends} if digits == 1 else {"YY.tens": ends - 1, "YY.ones": ends}
    named["century"] = ends - digits  # the start year's century token
    return replace(data, named_positions=named)


def _check_century(tokenizer: PreTrainedTokenizerBase, years: YearTokens, century: str, starts: list[int]) -> None:
    """Refuse a century after which this tokenizer does not split years as ``years`` says."""
    if century == CENTURY:
        return
    probe = PROBE[: -len(CENTURY)] + century
    base = encode(tokenizer, probe)
    for yy in [CORRUPTED_YY, *starts]:
        ids = encode(tokenizer, probe + f"{years.separator}{yy:02d}")
        expected = [years.tokens[yy // 10], years.tokens[yy % 10]] if years.scheme is YearScheme.DIGIT \
            else [years.tokens[yy]]
        if ids[: len(base)] != base or ids[len(base):] != expected:
            raise DataError(
                f"greater-than: this tokenizer splits the years of century {century} (e.g. {century}{yy:02d}) "
                f"unlike those of {CENTURY}; leave century {century} out"
            )


def _prompt(template: str, noun: str, century: str, yy: int, separator: str) -> str:
    return template.format(NOUN=noun, START=f"{century}{separator}{yy:02d}", CENTURY=century)
