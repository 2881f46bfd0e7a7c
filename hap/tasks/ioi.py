"""Indirect object identification (Wang et al. 2022): "When Mary and John went to
the store, John gave a drink to" -> " Mary" (the indirect object) vs " John" (the
subject).

Each template names two people first ([X] and [Y]), then the subject again ([S]).
Even rows use the ABBA order (X = IO, Y = S), odd rows BABA (X = S, Y = IO), so
the two orders are balanced. The corrupted prompt is the "ABC" one: X, Y and S
are replaced by three fresh, distinct names that differ from both clean names, so
the answer is no longer determined. Names, places and objects are kept only if
they are one known token with a leading space in the given tokenizer, which makes
clean and corrupted prompts the same token length. The metric is the logit
difference IO - S.

The generator takes its vocabulary (templates, names, places, objects) as
arguments, so a held-out split can use templates and names that the training
split never sees (``hap.tasks.splits``). Every fourth template and every fourth
name (by position in these lists) is the held-out quarter.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from .base import TaskData, check_n_examples, make_task_data, single_token_id, single_token_words

# {X} and {Y} are the first two names, {S} the repeated subject; the prompt ends
# right before the indirect object.
TEMPLATES: tuple[str, ...] = (
    "When {X} and {Y} went to the {PLACE}, {S} gave a {OBJECT} to",
    "Then, {X} and {Y} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {X} and {Y} had a lot of fun at the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {X} and {Y} were working at the {PLACE}. {S} decided to give a {OBJECT} to",
    "Then, {X} and {Y} were thinking about going to the {PLACE}. {S} wanted to give a {OBJECT} to",
    "Then, {X} and {Y} had a long argument, and afterwards {S} said to",
    "After {X} and {Y} went to the {PLACE}, {S} gave a {OBJECT} to",
    "When {X} and {Y} got a {OBJECT} at the {PLACE}, {S} decided to give it to",
    "When {X} and {Y} got a {OBJECT} at the {PLACE}, {S} decided to give the {OBJECT} to",
    "While {X} and {Y} were working at the {PLACE}, {S} gave a {OBJECT} to",
    "While {X} and {Y} were commuting to the {PLACE}, {S} gave a {OBJECT} to",
    "After the lunch, {X} and {Y} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Afterwards, {X} and {Y} went to the {PLACE}. {S} gave a {OBJECT} to",
    "Then, {X} and {Y} had a long argument. Afterwards {S} said to",
    "The {PLACE} {X} and {Y} went to had a {OBJECT}. {S} gave it to",
    "Friends {X} and {Y} found a {OBJECT} at the {PLACE}. {S} gave it to",
    "Today {X} and {Y} were cooking dinner at the {PLACE}. {S} handed a {OBJECT} to",
    "At the {PLACE}, {X} and {Y} met for lunch. {S} gave a {OBJECT} to",
    "When {X} and {Y} arrived at the {PLACE}, {S} passed a {OBJECT} to",
    "Yesterday {X} and {Y} visited the {PLACE}, and {S} brought a {OBJECT} to",
    "After a long day at the {PLACE}, {X} and {Y} sat down. {S} handed the {OBJECT} to",
    "Later, {X} and {Y} were playing a game at the {PLACE}. {S} threw the {OBJECT} to",
    "On the way to the {PLACE}, {X} and {Y} stopped for a break. {S} offered a {OBJECT} to",
    "Last week {X} and {Y} cleaned the {PLACE}. {S} showed the {OBJECT} to",
    "Before {X} and {Y} left the {PLACE}, {S} sent a {OBJECT} to",
    "So {X} and {Y} walked to the {PLACE} together. There, {S} gave a {OBJECT} to",
    "In the morning, {X} and {Y} went to the {PLACE}. {S} sold a {OBJECT} to",
    "Then {X} met {Y} at the {PLACE}, and {S} gave a {OBJECT} to",
    "Once {X} and {Y} reached the {PLACE}, {S} lent a {OBJECT} to",
    "During the party at the {PLACE}, {X} and {Y} talked. {S} gave a {OBJECT} to",
    "It was raining, so {X} and {Y} stayed at the {PLACE}. {S} gave a {OBJECT} to",
    "After school, {X} and {Y} went to the {PLACE}, where {S} gave a {OBJECT} to",
)

NAMES: tuple[str, ...] = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Alice", "Bob",
    "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Jack", "Kate", "Leo", "Lucy",
    "Mike", "Paul", "Rose", "Sam", "Sara", "Tim", "Anna", "Ben", "Chris", "Eve",
    "Fred", "Jane", "Joe", "Kim", "Lisa", "Max", "Ray", "Ruth", "Tony", "Will",
    "Adam", "Beth", "Carl", "Dave", "Jim", "Matt", "Pete", "Sue", "Ann", "Jeff",
    "Mark", "Steve", "Kevin", "Laura", "Helen", "Ryan", "Ella", "Nick", "Alex", "Julia",
    "Sophie", "Peter", "George", "Daniel", "Michael", "Sarah", "Emily", "Olivia", "Jacob", "Lily",
    "Harry", "Oliver", "Charlie", "Andrew", "Rachel", "Thomas", "Robert", "Linda", "Susan", "Brian",
    "Eric", "Maria", "Jason", "Hannah",
)  # fmt: skip

PLACES: tuple[str, ...] = (
    "store", "shop", "school", "park", "hospital", "office", "restaurant", "station",
    "garden", "house", "beach", "library", "museum", "market", "church", "cafe",
)  # fmt: skip

# Consonant-initial, so "a [OBJECT]" reads naturally.
OBJECTS: tuple[str, ...] = (
    "drink", "book", "ball", "bone", "kiss", "necklace", "ring", "snack", "gift",
    "letter", "basket", "bag", "flower", "phone", "key", "pen", "cup", "hat", "computer",
)  # fmt: skip

MIN_NAMES = 5  # two clean names plus three fresh corrupted ones


def ioi_task(
    tokenizer: PreTrainedTokenizerBase,
    n_examples: int,
    seed: int = 0,
    templates: Sequence[str] = TEMPLATES,
    names: Sequence[str] = NAMES,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
    bos: bool | None = None,
) -> TaskData:
    """``n_examples`` IOI prompts with ABC corruptions, reproducible from ``seed``.

    ``bos``: prompts begin with the tokenizer's BOS (``None``: as the tokenizer does by default).
    Rows alternate ABBA / BABA. ``answer_ids`` is the indirect object (" A"),
    ``wrong_ids`` the subject (" B"). Clean and corrupted names both come from
    ``names`` (filtered to single tokens here), templates from ``templates``.
    Raises ``DataError`` if fewer than ``MIN_NAMES`` names (or no place or
    object) are single tokens here, or a template lacks a placeholder.
    """
    check_n_examples(n_examples)
    if not templates:
        raise DataError("ioi: no templates to draw from")
    for template in templates:
        if not all(" " + field in template for field in ("{X}", "{Y}", "{S}")):
            raise DataError(
                f"ioi: template {template!r} must contain {{X}}, {{Y}} and {{S}}, each after a space (a name is "
                "the token ' Name'; at the start of a prompt it would be tokenised differently)"
            )
    n_given = len(names)
    names = single_token_words(tokenizer, names)
    places = single_token_words(tokenizer, places)
    objects = single_token_words(tokenizer, objects)
    if len(names) < MIN_NAMES:
        raise DataError(
            f"ioi: only {len(names)} of {n_given} names ({', '.join(names) or 'none'}) are a single known token "
            f"with a leading space in this tokenizer; IOI needs at least {MIN_NAMES} (two clean names and three "
            "fresh ones for the corruption). Use a tokenizer whose vocabulary has common first names as whole tokens."
        )
    if not places or not objects:
        raise DataError(
            "ioi: no place or no object word is a single known token with a leading space in this tokenizer; "
            "use a tokenizer whose vocabulary has common English words as whole tokens."
        )

    rng = random.Random(seed)
    clean_prompts: list[str] = []
    corrupted_prompts: list[str] = []
    answers: list[int] = []
    wrongs: list[int] = []
    for i in range(n_examples):
        template = rng.choice(list(templates))
        place, obj = rng.choice(places), rng.choice(objects)
        io, subject = rng.sample(names, 2)
        fresh = rng.sample([name for name in names if name not in (io, subject)], 3)
        first, second = (io, subject) if i % 2 == 0 else (subject, io)  # ABBA on even rows, BABA on odd
        clean_prompts.append(template.format(X=first, Y=second, S=subject, PLACE=place, OBJECT=obj))
        corrupted_prompts.append(template.format(X=fresh[0], Y=fresh[1], S=fresh[2], PLACE=place, OBJECT=obj))
        answers.append(_name_id(tokenizer, io))
        wrongs.append(_name_id(tokenizer, subject))
    # Every substituted word is one token, so each pair has equal length; make_task_data checks it row by row.
    data = make_task_data("ioi", tokenizer, clean_prompts, corrupted_prompts, answers, wrongs, bos=bos)
    return replace(data, named_positions=ioi_positions(data.clean_ids, data.answer_ids, data.wrong_ids))


def ioi_positions(clean_ids: Tensor, io_ids: Tensor, s_ids: Tensor) -> dict[str, Tensor]:
    """Where the names are in each prompt [N, T]: ``IO`` (the indirect object's one mention), ``S1`` (the
    subject's first mention), ``S1+1`` (the token after it) and ``S2`` (its second mention, the one the
    sentence's verb follows)."""
    io_at = clean_ids == io_ids[:, None]
    s_at = clean_ids == s_ids[:, None]
    width = torch.arange(clean_ids.shape[1])
    first_io = torch.where(io_at, width, clean_ids.shape[1]).min(1).values
    first_s = torch.where(s_at, width, clean_ids.shape[1]).min(1).values
    last_s = torch.where(s_at, width, -1).max(1).values
    if bool((first_io == clean_ids.shape[1]).any() | (first_s == last_s).any()):
        raise DataError("ioi: a prompt does not mention the indirect object once and the subject twice; every "
                        "template needs {X}, {Y} and {S} as separate words")
    return {"IO": first_io, "S1": first_s, "S1+1": first_s + 1, "S2": last_s}


def _name_id(tokenizer: PreTrainedTokenizerBase, name: str) -> int:
    token = single_token_id(tokenizer, " " + name)
    assert token is not None, name  # names were filtered to single tokens
    return token
