"""Words of the built-in word-level tokenizer used by the tiny test models.

Every word here is one token of ``tiny-llama`` / ``tiny-gpt2``. Task code that
wants to run on tiny models (IOI names, places, objects, template words, the
two-digit numbers of greater-than) needs its words listed here; anything else
maps to ``[UNK]``.
"""

from __future__ import annotations

SPECIAL_TOKENS = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]

PUNCTUATION = [".", ",", "!", "?", ":", ";", "'", '"', "-", "(", ")"]

NAMES = """
Mary John Tom James Dan Sid Martin Amy Alice Bob Carol David Emma Frank Grace
Henry Ivy Jack Kate Leo Lucy Mike Nina Oscar Paul Rose Sam Sara Tim Anna Ben
Chris Eve Fred Jane Joe Kim Lisa Max Ned Pat Ray Ruth Tony Will Adam Beth Carl
Dave Ed Jim Josh Matt Pete Rob Sue Ann Jeff Mark Steve Kevin Laura Helen Ryan
""".split()

WORDS = """
the a an and to of in on at for with from by as is was were be been it its he she
they them his her their this that there then when while after before afterwards
went go goes going gave give gives given had has have got get gets took take
takes brought bring handed hand passed pass sent send showed show threw throw
said say says told tell asked ask wanted want decided decide liked like loved
store shop school park hospital office restaurant station garden house beach
library museum market church cafe kitchen bank lake farm forest city river
drink book ball bone kiss necklace ring snack gift letter basket apple bag coat
flower phone key pen cup drink hat computer
friends friend together dinner lunch party meeting game day time way home work
place spent long lot fun found find had argument quarrel after happy some
year years war lasted lasting until up started began ended ended expedition
conflict through century age era reign deal contract treaty peace
the The When Then While After Afterwards Friends So But And
""".split()

NUMBERS = [f"{n:02d}" for n in range(100)] + [str(n) for n in range(10, 21)]

# Appended after NUMBERS so the ids of all earlier tokens stay unchanged.
TASK_WORDS = """
working thinking about commuting
Alex Andrew Brian Charlie Daniel Ella Emily Eric George Hannah Harry Jacob Jason Julia Lily Linda Maria
Michael Nick Oliver Olivia Peter Rachel Robert Sarah Sophie Susan Thomas
At Before During In It Last On Once There Yesterday Today Later
arrived between break cleaned cooking down force left lent met morning offered playing raining ran reached
sat so sold stayed stopped talked visited walked week where
alliance campaign dynasty famine journey rebellion siege voyage
""".split()


def tiny_vocabulary() -> list[str]:
    """All tokens of the tiny tokenizer, specials first, no duplicates, stable order."""
    seen: dict[str, None] = {}
    for word in SPECIAL_TOKENS + PUNCTUATION + NAMES + WORDS + NUMBERS + TASK_WORDS:
        seen.setdefault(word, None)
    return list(seen)
