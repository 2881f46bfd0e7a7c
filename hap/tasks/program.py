"""Tasks of a compiled tracr program, built from the program itself.

A tracr model answers at every position, so one example here is one (input, position) pair:
the clean input is a random sequence from the program's vocabulary (BOS, then 1 to
``max_seq_len`` tokens), the corrupted input another random sequence of the same length,
and the example's answer position is one where the program's outputs on the two differ
(positions where they agree carry no signal and are skipped; so are BOS and padding, and positions
where the clean output holds no value, tracr's None: ``decode_outputs``).
The compiled model is the oracle: tracr's compiled weights reproduce the program
exactly (``hap verify``), so its outputs are the program's.

* categorical output: answer = the clean output's index, wrong = the corrupted output's
  index (where the corrupted output holds no value: its largest entry besides the answer),
  metric the logit difference (tracr's "logits" are its one-hot output space);
* numerical output (one column): ``Metric.VALUE`` with the two outputs as values.

Train and test splits are disjoint in their clean inputs: each input sequence is hashed
(sha256 of its tokens) into the test side with probability ``test_fraction``.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from ..errors import DataError
from ..models.tracr import TracrTransformer, decode_outputs, load_tracr, sample_inputs, tracr_dir
from .base import Metric, TaskData

OUTPUTS_DIFFER = 1e-6  # numerical outputs closer than this count as equal
DRAW = 256  # input pairs drawn per round
MAX_ROUNDS = 200


def is_program_task(name: str) -> bool:
    """Whether ``name`` names a tracr program (``tracr-reverse`` or a compiled directory)."""
    return tracr_dir(name) is not None


def _test_side(tokens: list[str], test_fraction: float) -> bool:
    digest = hashlib.sha256(" ".join(tokens).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def program_task(program: str, n_examples: int, seed: int = 0, split: str = "all",
                 test_fraction: float | None = None) -> TaskData:
    """``n_examples`` (input, position) examples of a tracr program (a ``tracr-<name>`` or a directory).

    ``split`` "train" or "test" keeps only inputs whose hash falls on that side of
    ``test_fraction``; "all" keeps every input. The same arguments give the same examples.
    """
    folder = tracr_dir(program)
    if folder is None:
        raise DataError(f"{program!r} is not a tracr program: give tracr-<name> or a compiled tracr directory")
    model, tokenizer = load_tracr(folder)
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {key: [] for key in ("clean", "corrupted", "length", "position", "answer", "wrong")}
    for _ in range(MAX_ROUNDS):
        lengths = torch.randint(1, config.max_seq_len + 1, (DRAW,), generator=generator)
        clean, corrupted = sample_inputs(config, lengths, generator), sample_inputs(config, lengths, generator)
        (clean_out, _), (corrupted_out, corrupted_logits) = _outputs(model, clean), _outputs(model, corrupted)
        for i in range(DRAW):
            n = int(lengths[i]) + 1  # with BOS
            tokens = [config.input_vocab[t] for t in clean[i, :n].tolist()]
            if split != "all" and _test_side(tokens[1:], test_fraction or 0.0) != (split == "test"):
                continue
            for position in range(1, n):
                a, w = clean_out[i, position], corrupted_out[i, position]
                if (a - w).abs() <= OUTPUTS_DIFFER if config.numerical else (a == w or a < 0):
                    continue
                if not config.numerical and w < 0:  # no value: the strongest other output is the wrong one
                    w = corrupted_logits[i, position].index_fill(0, a, float("-inf")).argmax()
                for key, value in (("clean", clean[i, :n]), ("corrupted", corrupted[i, :n]), ("length", n),
                                   ("position", position), ("answer", a), ("wrong", w)):
                    rows[key].append(value)
                if len(rows["clean"]) == n_examples:
                    return _task_data(program, model, rows)
    raise DataError(f"tracr program {program}: found only {len(rows['clean'])} of {n_examples} examples whose clean "
                    f"and corrupted outputs differ on the {split} side; ask for fewer examples")


def _outputs(model: TracrTransformer, ids: Tensor) -> tuple[Tensor, Tensor]:
    """([N, T] the program's output at each position: ``decode_outputs``, [N, T, V] the logits)."""
    with torch.no_grad():
        logits = model(ids).logits
    return decode_outputs(model.config, logits), logits


def _task_data(name: str, model: TracrTransformer, rows: dict[str, list]) -> TaskData:
    config = model.config
    lengths = torch.tensor(rows["length"])
    width, pad = int(lengths.max()), config.input_vocab.index(config.pad)

    def padded(sequences: list[Tensor]) -> Tensor:
        return torch.stack([torch.cat([ids, ids.new_full((width - len(ids),), pad)]) for ids in sequences])

    clean, corrupted = padded(rows["clean"]), padded(rows["corrupted"])

    def text(ids: Tensor, n: int) -> str:
        return " ".join(config.input_vocab[t] for t in ids[:n].tolist())

    if config.numerical:
        answers = torch.zeros(len(lengths), dtype=torch.long)
        values = {"metric": Metric.VALUE, "answer_values": torch.stack(rows["answer"]).float(),
                  "wrong_values": torch.stack(rows["wrong"]).float()}
        wrong = answers
    else:
        answers, wrong, values = torch.stack(rows["answer"]), torch.stack(rows["wrong"]), {}
    return TaskData(
        name=name,
        clean_prompts=[text(ids, n) for ids, n in zip(clean, rows["length"])],
        corrupted_prompts=[text(ids, n) for ids, n in zip(corrupted, rows["length"])],
        clean_ids=clean, corrupted_ids=corrupted, lengths=lengths,
        answer_ids=answers, wrong_ids=wrong,
        positions=torch.tensor(rows["position"]), **values,
        named_positions={f"p{i}": torch.where(i < lengths, i, -1) for i in range(width)},
    )
