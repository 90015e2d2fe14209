"""The noise filter of GSSculpt (paper section 3.4): keep a text-mask pair when the mask that a referring
segmentation model draws from the text alone overlaps the annotated mask with IoU >= a threshold (0.5).

Pure logic, no model: which objects are judged, the IoU (pycocotools, through ``sculpt.annotation.rle``), the text
checks that need no model, and the verdict: one rule (``CHECKS``, in order) whose first failed check is the pair's
``reject_reason``. The verify stage (``actors/verify.py``) runs EVF-SAM2 and hands its masks here.
"""

from __future__ import annotations

import difflib
import math
import os
import re

import numpy as np

from sculpt.annotation import grounding, rle
from sculpt.annotation.categories import NEGATIVE

DEFAULT_THRESHOLD = 0.5
# The ambiguity test: the pair's IoU must beat the verifier mask's IoU with any other object of the image by this
# much. An unambiguous reference scores high on its target and near zero elsewhere; one that also fits another
# object ("the dog" with two dogs present) draws a mask over both, about as close to each.
DEFAULT_MARGIN = 0.1
# A negative names nothing present: kept when the verifier draws (nearly) nothing, at most this share of the image.
DEFAULT_NEGATIVE_AREA = 0.01
# Expression length bounds, in words as written: the refer prompt asks for about 16 words (negatives 12)
DEFAULT_MIN_WORDS = 3
DEFAULT_MAX_WORDS = 40
# Two expressions of one image are near-same when difflib's ratio over their normalised words (``words``) is at
# least this; 1.0: only when equal. Below 1 a long expression differing in one word ("left"/"right") counts too.
DEFAULT_DUPLICATE_SIMILARITY = 1.0
# The listener's check: its box for the expression (actors/listen.py) against the pair's box, box IoU at least this
DEFAULT_LISTENER_THRESHOLD = 0.5
ARTICLES = frozenset({"a", "an", "the"})
SEMANTIC_PREFIX = "[semantic] "  # EVF-SAM2-multitask's semantic-level mode (stuff, parts, all instances of a kind)
SEMANTIC_CATEGORIES = ("stuff", "part")
# A reasoning pair (``style``, sculpt.annotation.reasoning) is judged by the same rule, its IoU against this threshold
# (the ``reasoning_threshold`` param; by default the plain pairs' own: no evidence yet that they need another)
REASONING = "reasoning"
DEFAULT_REASONING_THRESHOLD = DEFAULT_THRESHOLD


def is_multitask(source: str) -> bool:
    """An EVF-SAM2 -multitask checkpoint (which knows the semantic prefix), by its id or directory name."""
    return "multitask" in os.path.basename(os.path.normpath(source)).lower()


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) or not 0 <= threshold <= 1:
        raise ValueError(f"verify threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise ValueError(f"verify {name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_words(min_words, max_words) -> tuple[int, int]:
    for name, value in (("min_words", min_words), ("max_words", max_words)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"verify {name} must be a whole number >= 0, got {value!r}")
    if max_words < min_words:
        raise ValueError(f"verify max_words ({max_words}) is below min_words ({min_words})")
    return min_words, max_words


def words(text: str | None) -> tuple[str, ...]:
    """The normalised words the text checks compare: lower-cased, punctuation and articles dropped.

    >>> words("The dog, on the LEFT.")
    ('dog', 'on', 'left')
    """
    return tuple(w for w in re.findall(r"\w+", (text or "").lower()) if w not in ARTICLES)


def near_same(a: tuple[str, ...], b: tuple[str, ...], similarity: float) -> bool:
    return a == b or (similarity < 1 and difflib.SequenceMatcher(None, a, b).ratio() >= similarity)


def is_pair(obj: dict) -> bool:
    """A mask and a non-blank expression: what the verifier judges."""
    return bool(obj.get("mask")) and bool((obj.get("expression") or "").strip())


def duplicated(objects: list[dict], i: int, similarity: float) -> bool:
    """Another pair of the image has the same or a near-same expression: neither says which target it means."""
    mine = words(objects[i].get("expression"))
    return any(near_same(mine, words(obj["expression"]), similarity)
               for j, obj in enumerate(objects) if j != i and is_pair(obj))


def _negative(obj: dict) -> bool:
    return obj.get("category") == NEGATIVE


def _image_area(obj: dict) -> int:
    height, width = obj["mask"]["size"]  # a negative's empty mask has the image's size
    return height * width


def _count(obj: dict) -> int:
    return len((obj.get("expression") or "").split())


# The keep rule, in order: (reject_reason, failed(pair, params, duplicate)). A pair is kept when none fails; its
# reject_reason is the first that does. The text checks come first: they need no model and explain the most.
CHECKS = (
    ("no_expression", lambda o, p, dup: not words(o.get("expression"))),
    ("too_short", lambda o, p, dup: _count(o) < p["min_words"]),
    ("too_long", lambda o, p, dup: _count(o) > p["max_words"]),
    ("repeats_phrase", lambda o, p, dup: not _negative(o) and words(o["expression"]) == words(o.get("phrase"))),
    ("duplicate_expression", lambda o, p, dup: dup),
    ("verify_error", lambda o, p, dup: bool(o.get("error"))),
    # the second opinion, a box-level one: the listener found the expression elsewhere (before the mask checks, so
    # that low_iou then means "the right place, but the masks disagree"); null (not asked) passes
    ("listener", lambda o, p, dup: not _negative(o) and o.get("listener_iou") is not None
     and o["listener_iou"] < p["listener_threshold"]),
    ("low_iou", lambda o, p, dup: not _negative(o) and o["iou"] < _threshold(o, p)),
    ("rival", lambda o, p, dup: not _negative(o) and o["iou"] - o["rival_iou"] < p["margin"]),
    ("negative_drawn", lambda o, p, dup: _negative(o) and o["verifier_area"] > p["negative_area"] * _image_area(o)),
)
# The rule's last check, on reasoning pairs only: the object it names was not kept (it needs that object's verdict,
# ``judge`` hands it over), so a kept reasoning pair always names a kept object
UNKEPT_TARGET = "unkept_target"
REASONS = tuple(reason for reason, _ in CHECKS) + (UNKEPT_TARGET,)


def _threshold(obj: dict, params: dict) -> float:
    if obj.get("style") == REASONING:
        return params.get("reasoning_threshold", params["threshold"])
    return params["threshold"]


def reject_reason(obj: dict, params: dict, duplicate: bool = False, target_kept: bool | None = None) -> str | None:
    """The first check of ``CHECKS`` that the judged pair fails, then for a reasoning pair whether its target was
    kept (``target_kept``; None: not known, not checked); None: it passes them all and is kept."""
    reason = next((reason for reason, failed in CHECKS if failed(obj, params, duplicate)), None)
    if reason is None and obj.get("style") == REASONING and target_kept is False:
        return UNKEPT_TARGET
    return reason


def listened(objects: list[dict], i: int) -> bool:
    """Whether the listener asks about pair i: a pair of a box (not a negative) and no object error that passes the
    text checks whatever the verify stage's params (an expression with words, not its phrase's, no other pair's
    equal). Length bounds are params: it asks about pairs out of bounds too, which the rule rejects first."""
    obj = objects[i]
    mine = words(obj.get("expression"))
    return (is_pair(obj) and not _negative(obj) and obj.get("box") is not None and not obj.get("error") and bool(mine)
            and mine != words(obj.get("phrase")) and not duplicated(objects, i, 1.0))


def listener_iou(boxes: list, target) -> float:
    """The listener's box against the pair's box (for a group its union box): the union box of what the listener
    answered (several boxes for one expression: it found several things), as float32 as stored. No box: 0."""
    if not boxes:
        return 0.0
    union = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    return float(np.float32(grounding.box_iou(union, target)))


def split(objects: list[dict]) -> tuple[list[int], list[int]]:
    """(indices of the objects to verify: a mask and an expression, indices of those whose expression is blank).

    Objects without a mask or without an expression (e.g. an earlier stage failed on them) are not pairs and
    are left as they are.
    """
    todo, blank = [], []
    for i, obj in enumerate(objects or []):
        if obj.get("mask") and obj.get("expression") is not None:
            (todo if obj["expression"].strip() else blank).append(i)
    return todo, blank


def related(objects: list[dict], i: int) -> set[int]:
    """Object i, its members (a group) and the groups it belongs to, and the reasoning pairs of these (which share
    their masks): not rivals of its pair. A reasoning pair's are its target's, and itself."""
    target = objects[i].get("target")
    base = target if target is not None and 0 <= target < len(objects) else i
    out = {i, base} | set(objects[base].get("members") or [])
    out |= {j for j, obj in enumerate(objects) if base in (obj.get("members") or [])}
    return out | {j for j, obj in enumerate(objects) if obj.get("target") in out}


def judge(objects: list[dict], i: int, verifier_mask: dict, params: dict) -> None:
    """The figures and the verdict on pair i of an image's objects, given the verifier's mask (RLE) for its expression.

    - ``iou``: the verifier mask against the object's own mask; ``rival_iou``: its highest IoU with any other
      masked object of the image (not its own members or groups); a negative (target absent, empty mask) has
      ``verifier_area`` only.
    - ``reject_reason``: the first failed check of ``CHECKS`` (None when kept), ``kept``: it is None.

    Figures are rounded to float32 first, as the output stores them, so ``kept`` always agrees with them. Masks
    of different sizes make an object-level error.
    """
    obj = objects[i]
    try:
        obj["verifier_area"] = rle.area(verifier_mask)
        obj.update(iou=None, rival_iou=None)
        if obj.get("category") != NEGATIVE:
            own = related(objects, i)
            others = [o["mask"] for j, o in enumerate(objects) if j not in own and o.get("mask") and o.get("category") != NEGATIVE]
            obj["iou"] = float(np.float32(rle.iou(verifier_mask, obj["mask"])))
            obj["rival_iou"] = float(np.float32(max(rle.ious(verifier_mask, others), default=0.0)))
    except ValueError as exc:
        obj.update(iou=None, rival_iou=None, error=f"verify: {exc}")
    target = obj.get("target")  # a reasoning pair: its target comes before it, judged already
    target_kept = bool(objects[target].get("kept")) if target is not None and 0 <= target < len(objects) else None
    obj["reject_reason"] = reject_reason(obj, params, duplicated(objects, i, params["duplicate_similarity"]), target_kept)
    obj["kept"] = obj["reject_reason"] is None


def reject_blank(obj: dict) -> None:
    obj.update(iou=None, kept=False, reject_reason="no_expression", error="verify: blank referring expression")
