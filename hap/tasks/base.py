"""The task data every method consumes: clean and corrupted prompts of equal token
length, the answer and wrong tokens, and the task's own metric.

``TaskData`` is a frozen dataclass of right-padded tensors. Row ``i`` of
``clean_ids`` and ``corrupted_ids`` has the same real length ``lengths[i]``; the
answer is predicted at position ``lengths[i] - 1``, or at ``positions[i]`` when
a task sets them (a tracr program answers at every position). The metric is a
logit difference (answer minus wrong, e.g. IOI), a probability difference over
sets of good and bad tokens (greater-than), or, for a model with one numerical
output, how much closer the output is to the clean answer than to the
corrupted one; ``logit_diff`` computes whichever the task uses so callers never
need to know which.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Iterator, Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ..errors import DataError


END = "END"  # the name of the answer position among a task's named positions


class Metric(Enum):
    """How a task scores the logits at its answer position (higher = more correct)."""

    LOGIT_DIFF = "logit-diff"  # logit[answer] - logit[wrong]
    PROB_DIFF = "prob-diff"  # softmax mass on good tokens - mass on bad tokens
    VALUE = "value"  # one numerical output y: |y - wrong value| - |y - answer value|


@dataclass(frozen=True)
class TaskData:
    """N examples of one task, tokenised and right-padded, with the task's metric.

    Shapes: ``clean_ids``/``corrupted_ids`` [N, T] long, ``lengths``,
    ``answer_ids``, ``wrong_ids`` [N] long. For ``Metric.PROB_DIFF`` tasks,
    ``candidate_ids`` [C] lists the tokens the metric looks at and
    ``good_mask``/``bad_mask`` [N, C] bool say which of them are correct or wrong
    for each example; they are ``None`` for ``Metric.LOGIT_DIFF`` tasks.
    ``positions`` [N] long: the answer position of each row (``None``: the
    last real token, ``lengths - 1``). ``answer_values``/``wrong_values`` [N]
    float: the clean and the corrupted run's output, for ``Metric.VALUE``.
    ``bos``: every row begins with the tokenizer's BOS prefix (position 0 is
    then no word of the prompt). ``named_positions``: the token positions that
    matter in every example, name -> [N] long (IOI: ``IO``, ``S1``, ``S1+1``,
    ``S2``), ``-1`` where a row has no such token; ``named()`` adds ``END``,
    the answer position.
    """

    name: str
    clean_prompts: list[str]
    corrupted_prompts: list[str]
    clean_ids: Tensor
    corrupted_ids: Tensor
    lengths: Tensor
    answer_ids: Tensor
    wrong_ids: Tensor
    metric: Metric = Metric.LOGIT_DIFF
    candidate_ids: Tensor | None = None
    good_mask: Tensor | None = None
    bad_mask: Tensor | None = None
    positions: Tensor | None = None
    answer_values: Tensor | None = None
    wrong_values: Tensor | None = None
    bos: bool = False  # every row begins with the tokenizer's special prefix (its BOS token)
    named_positions: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        n = len(self.clean_prompts)
        shapes_ok = (
            len(self.corrupted_prompts) == n
            and self.clean_ids.ndim == 2
            and self.clean_ids.shape == self.corrupted_ids.shape
            and self.clean_ids.shape[0] == n
            and all(t.shape == (n,) for t in (self.lengths, self.answer_ids, self.wrong_ids))
        )
        if not shapes_ok:
            raise DataError(
                f"task {self.name!r}: prompts, token ids, lengths and answers disagree on the number of examples"
            )
        if self.metric is Metric.PROB_DIFF:
            if self.candidate_ids is None or self.good_mask is None or self.bad_mask is None:
                raise DataError(f"task {self.name!r}: a prob-diff metric needs candidate_ids, good_mask and bad_mask")
            c = self.candidate_ids.shape[0]
            if self.good_mask.shape != (n, c) or self.bad_mask.shape != (n, c):
                raise DataError(f"task {self.name!r}: good_mask and bad_mask must have shape [{n}, {c}]")
        if self.metric is Metric.VALUE and not all(
                t is not None and t.shape == (n,) for t in (self.answer_values, self.wrong_values)):
            raise DataError(f"task {self.name!r}: a value metric needs answer_values and wrong_values of shape [{n}]")
        if self.positions is not None and (
                self.positions.shape != (n,) or bool((self.positions < 0).any() | (self.positions >= self.lengths).any())):
            raise DataError(f"task {self.name!r}: positions must be [{n}] and inside each row's real tokens")
        for label, where in (self.named_positions or {}).items():
            if where.shape != (n,) or bool(((where < -1) | (where >= self.lengths)).any()):
                raise DataError(f"task {self.name!r}: named position {label!r} must be [{n}], each -1 (absent) or "
                                "inside its row's real tokens")

    def __len__(self) -> int:
        return len(self.clean_prompts)

    @property
    def answer_positions(self) -> Tensor:
        """[N] long: where each row's answer is predicted."""
        return self.lengths - 1 if self.positions is None else self.positions

    def named(self) -> dict[str, Tensor]:
        """The task's named positions (name -> [N] long, -1 where a row has none), then ``END``: the answer
        position. Empty but for ``END`` when the task names none."""
        return {**(self.named_positions or {}), END: self.answer_positions}

    def slice(self, start: int, stop: int) -> TaskData:
        """Examples ``start`` to ``stop`` (exclusive), trimmed to their own longest row."""
        if start >= stop or start >= len(self):
            raise DataError(f"task {self.name!r}: no examples in [{start}, {stop})")
        return self._rows(slice(start, stop))

    def select(self, indices: Sequence[int]) -> TaskData:
        """The examples at ``indices`` (in that order), trimmed to their own longest row."""
        if not indices or not all(0 <= i < len(self) for i in indices):
            raise DataError(f"task {self.name!r}: select needs row numbers in [0, {len(self)}), got {list(indices)[:8]}")
        return self._rows(torch.tensor(list(indices), dtype=torch.long))

    def _rows(self, rows: slice | Tensor) -> TaskData:
        width = int(self.lengths[rows].max())
        pick = (lambda items: items[rows]) if isinstance(rows, slice) else \
            (lambda items: [items[i] for i in rows.tolist()])
        return replace(
            self,
            clean_prompts=pick(self.clean_prompts),
            corrupted_prompts=pick(self.corrupted_prompts),
            clean_ids=self.clean_ids[rows, :width],
            corrupted_ids=self.corrupted_ids[rows, :width],
            lengths=self.lengths[rows],
            answer_ids=self.answer_ids[rows],
            wrong_ids=self.wrong_ids[rows],
            good_mask=None if self.good_mask is None else self.good_mask[rows],
            bad_mask=None if self.bad_mask is None else self.bad_mask[rows],
            positions=None if self.positions is None else self.positions[rows],
            answer_values=None if self.answer_values is None else self.answer_values[rows],
            wrong_values=None if self.wrong_values is None else self.wrong_values[rows],
            named_positions=None if self.named_positions is None else
            {label: where[rows] for label, where in self.named_positions.items()},
        )

    def batches(self, batch_size: int) -> Iterator[TaskData]:
        """Consecutive slices of ``batch_size`` examples (the last may be shorter),
        each trimmed to its own longest row so no batch carries needless padding."""
        if batch_size <= 0:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.slice(start, start + batch_size)

    def at_answer(self, logits: Tensor) -> Tensor:
        """Pick the answer position of each row: logits [N, T, V] -> [N, V]."""
        self._check_rows(logits, 3)
        rows = torch.arange(len(self), device=logits.device)
        return logits[rows, self.answer_positions.to(logits.device)]

    def logit_diff(self, logits: Tensor) -> Tensor:
        """The task metric per example, higher = more correct: logits [N, V] at the
        answer positions -> [N]. Logit difference answer - wrong for ``LOGIT_DIFF``
        tasks; softmax mass on good minus bad tokens (float32) for ``PROB_DIFF``;
        for ``VALUE``, |y - wrong value| - |y - answer value| of the output y = logits[:, 0]
        (the full model scores |answer - wrong|, the corrupted run minus that)."""
        self._check_rows(logits, 2)
        if self.metric is Metric.VALUE:
            assert self.answer_values is not None and self.wrong_values is not None
            output = logits[:, 0].float()
            return (output - self.wrong_values.to(logits.device)).abs() - \
                (output - self.answer_values.to(logits.device)).abs()
        if self.metric is Metric.LOGIT_DIFF:
            answer = logits.gather(1, self.answer_ids.to(logits.device)[:, None])
            wrong = logits.gather(1, self.wrong_ids.to(logits.device)[:, None])
            return (answer - wrong)[:, 0]
        assert self.candidate_ids is not None and self.good_mask is not None and self.bad_mask is not None
        probs = logits.float().softmax(-1)[:, self.candidate_ids.to(logits.device)]  # [N, C]
        good = (probs * self.good_mask.to(logits.device)).sum(-1)
        bad = (probs * self.bad_mask.to(logits.device)).sum(-1)
        return good - bad

    def correct(self, logits: Tensor) -> Tensor:
        """[N] bool: the answer beats the wrong answer (logits [N, V] at the answer
        positions). For every metric this is exactly ``logit_diff(logits) > 0`` (for ``VALUE``: the
        output is nearer the clean answer than the corrupted one)."""
        return self.logit_diff(logits) > 0

    def _check_rows(self, logits: Tensor, ndim: int) -> None:
        if logits.ndim != ndim or logits.shape[0] != len(self):
            want = "[N, T, V]" if ndim == 3 else "[N, V]"
            raise DataError(
                f"task {self.name!r}: expected logits of shape {want} with N={len(self)}, got {tuple(logits.shape)}"
            )


def check_n_examples(n_examples: int) -> None:
    """Raise ``DataError`` unless ``n_examples`` is a positive integer."""
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples <= 0:
        raise DataError(f"n_examples must be a positive integer, got {n_examples!r}")


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (answers, and the words a task checks are one token)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


PREFIX_PROBE = "When Mary and John went to the store"


def default_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special ids the tokenizer puts before a text by default: ``[bos]`` for Llama, Gemma and Mistral
    tokenizers, ``[]`` for GPT-2 and SmolLM2. Special ids it would append after the text (an EOS) are not a
    prompt's: the answer is predicted right after the prompt's last token, so prompts never get them."""
    full = list(tokenizer(PREFIX_PROBE)["input_ids"])
    bare = encode(tokenizer, PREFIX_PROBE)
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start]
    special = set(tokenizer.all_special_ids)  # the text itself came out otherwise: keep the leading specials
    leading = 0
    while leading < len(full) and full[leading] in special:
        leading += 1
    return full[:leading]


def prompt_prefix(tokenizer: PreTrainedTokenizerBase, bos: bool | None = None) -> list[int]:
    """The ids every prompt begins with. ``None``: as the tokenizer does by default (``default_prefix``);
    ``True``: its BOS token (its default prefix if it has one, else ``[bos_token_id]``); ``False``: nothing.
    ``DataError`` for ``True`` when the tokenizer has no BOS token."""
    if bos is False:
        return []
    prefix = default_prefix(tokenizer)
    if bos is None or prefix:
        return prefix
    if tokenizer.bos_token_id is None:
        raise DataError("--bos: this tokenizer has no BOS token to prepend; drop --bos (its prompts start with "
                        "their first word)")
    return [int(tokenizer.bos_token_id)]


def resolve_bos(tokenizer: PreTrainedTokenizerBase, bos: bool | None = None) -> bool:
    """Whether prompts will begin with a BOS prefix: ``bos`` itself, or (``None``) the tokenizer's default."""
    return bool(prompt_prefix(tokenizer, bos))


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, prefix: Sequence[int]) -> list[int]:
    """A prompt's ids: ``prefix`` (``prompt_prefix``), then the text's own ids. With the tokenizer's default
    prefix this equals ``tokenizer(text)["input_ids"]`` for tokenizers that only prepend."""
    return [*prefix, *encode(tokenizer, text)]


def single_token_id(tokenizer: PreTrainedTokenizerBase, text: str) -> int | None:
    """The id of ``text`` if it is exactly one known token, else ``None`` (the unknown token counts as unknown)."""
    ids = encode(tokenizer, text)
    if len(ids) != 1 or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id):
        return None
    return ids[0]


def single_token_words(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[str]:
    """The words that are one known token with a leading space (``" Mary"``), in order."""
    return [word for word in words if single_token_id(tokenizer, " " + word) is not None]


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for right padding: the pad token, else end-of-sequence, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def make_task_data(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    clean_prompts: list[str],
    corrupted_prompts: list[str],
    answer_ids: Sequence[int],
    wrong_ids: Sequence[int],
    bos: bool | None = None,
    **extras: object,
) -> TaskData:
    """Tokenise the prompt pairs, check each pair has equal non-zero length, and pad.

    ``bos``: whether every prompt begins with the tokenizer's BOS (``None``: as the tokenizer does by
    default; ``prompt_prefix``). ``extras`` are passed on to ``TaskData`` (``metric``, ``candidate_ids``,
    ``good_mask``, ``bad_mask``). Raises ``DataError`` naming the example whose clean and corrupted
    prompts differ in token length.
    """
    if not clean_prompts:
        raise DataError(f"task {name!r} has no examples")
    prefix = prompt_prefix(tokenizer, bos)
    clean = [encode_prompt(tokenizer, text, prefix) for text in clean_prompts]
    corrupted = [encode_prompt(tokenizer, text, prefix) for text in corrupted_prompts]
    for i, (a, b) in enumerate(zip(clean, corrupted, strict=True)):
        if len(a) != len(b) or len(a) == len(prefix):
            raise DataError(
                f"task {name!r}, example {i}: clean prompt is {len(a) - len(prefix)} tokens and corrupted prompt is "
                f"{len(b) - len(prefix)} tokens; they must be equal and non-zero"
            )
    lengths = [len(ids) for ids in clean]
    width = max(lengths)
    pad = pad_id(tokenizer)

    def padded(rows: list[list[int]]) -> Tensor:
        return torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows], dtype=torch.long)

    return TaskData(
        name=name,
        clean_prompts=list(clean_prompts),
        corrupted_prompts=list(corrupted_prompts),
        clean_ids=padded(clean),
        corrupted_ids=padded(corrupted),
        lengths=torch.tensor(lengths, dtype=torch.long),
        answer_ids=torch.tensor(list(answer_ids), dtype=torch.long),
        wrong_ids=torch.tensor(list(wrong_ids), dtype=torch.long),
        bos=bool(prefix),
        **extras,  # type: ignore[arg-type]
    )
