"""Reasoning references (issue 30, Ground-V's third challenge): an object named by what it is for, how it is used or
what one knows about it ("the fruit rich in antioxidants"), not by how it looks.

Pure logic, no model. The refer stage (``actors/refer.py``) asks the VLM about up to ``count`` objects of an image
whose plain pair passes the text checks (``candidates``), checks each answer (``clean_reasoning``) and appends it as
an object of its own (``reasoning_fields``): the target's mask, box and category, ``style`` ``reasoning`` and
``target`` (the target's index). The listen and verify stages then judge it by the same keep rule as every pair
(``sculpt.annotation.verify``), with one more check: its target must be kept (``unkept_target``).
"""

from __future__ import annotations

import re

from sculpt.annotation import verify
from sculpt.annotation.categories import head_noun
from sculpt.annotation.prompts import clean_expression

PLAIN, REASONING = "plain", verify.REASONING
DEFAULT_COUNT = 2  # reasoning references per image (the refer stage's ``reasoning`` param; 0: none)

# Words of how a thing looks, which a reasoning reference must not use: colours, materials, shapes, sizes and
# surfaces (besides the words of the target's own phrase, ``forbidden``).
VISIBLE_WORDS = frozenset("""
    red orange yellow green blue purple violet pink brown black white gray grey silver golden gold beige tan navy
    maroon teal turquoise cyan magenta dark light pale bright colored coloured colorful colourful striped spotted
    checkered plaid wooden wood metal metallic plastic glass leather stone brick concrete fabric paper furry fluffy
    round square rectangular circular oval triangular flat curved tall short long large big small tiny huge little
    wide narrow thick thin shiny transparent
""".split())
_SMALL_WORDS = frozenset({"a", "an", "the", "of", "and", "or", "its", "their", "his", "her", "one", "two", "three",
                          "four", "five", "some", "several", "many"})


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def forbidden(phrase: str | None) -> frozenset[str]:
    """The words a reasoning reference to an object of ``phrase`` must not use (singular forms): its head noun (it
    names the object), the phrase's other words (its visible attributes, "gray", "long"), and ``VISIBLE_WORDS``."""
    words = {w for w in re.findall(r"[a-z]+", (phrase or "").lower()) if w not in _SMALL_WORDS}
    words.add(head_noun(phrase or "")[0])
    return frozenset(_singular(w) for w in words | VISIBLE_WORDS if w)


def clean_reasoning(text: str, phrase: str | None) -> str:
    """One usable reasoning expression from the VLM's answer (``clean_expression``'s cleaning), or ValueError: unusable,
    or using a word of how the target looks or its name (``forbidden``)."""
    expression = clean_expression(text)
    used = {_singular(w) for w in re.findall(r"[a-z]+", expression.lower())} & forbidden(phrase)
    if used:
        raise ValueError(f"reasoning expression {expression[:80]!r} names how it looks or what it is: {sorted(used)}")
    return expression


def candidates(objects: list[dict], count: int) -> list[int]:
    """Up to ``count`` objects to ask a reasoning reference about: those whose plain pair the keep rule's text
    checks pass (``verify.listened``: a box, no error, an expression that is not its phrase's and no other pair's),
    not reasoning references themselves, the largest first (then in order)."""
    found = [i for i, obj in enumerate(objects) if obj.get("style") != REASONING and obj.get("target") is None
             and verify.listened(objects, i)]
    found.sort(key=lambda i: (-(objects[i].get("area") or 0), i))
    return sorted(found[:max(0, count)])


def reasoning_fields(objects: list[dict], target: int, expression: str) -> dict:
    """The fields of object ``target``'s reasoning pair (``schema.new_object(**fields)``): its mask, box, area,
    category and phrase (no caption span: it is not the caption's), the expression, ``style`` reasoning and
    ``target``."""
    obj = objects[target]
    return dict(phrase=obj.get("phrase"), box=obj.get("box"), mask=obj.get("mask"), area=obj.get("area"),
                             mask_score=obj.get("mask_score"), category=obj.get("category"), instances=obj.get("instances"),
                expression=expression, expression_words=len(expression.split()), style=REASONING, target=target)


def is_reasoning(obj: dict) -> bool:
    return obj.get("style") == REASONING
