"""The noise filter of GSSculpt (paper section 3.4): keep a text-mask pair when the mask that a referring
segmentation model draws from the text alone overlaps the annotated mask with IoU >= a threshold (0.5).

Pure logic, no model: which objects are judged, the IoU (pycocotools, through ``sculpt.annotation.rle``) and the verdict.
The verify stage (``actors/verify.py``) runs EVF-SAM2 and hands its masks here.
"""

from __future__ import annotations

import math
import os

import numpy as np

from sculpt.annotation import rle
from sculpt.annotation.categories import NEGATIVE

DEFAULT_THRESHOLD = 0.5
# The ambiguity test: the pair's IoU must beat the verifier mask's IoU with any other object of the image by this
# much. An unambiguous reference scores high on its target and near zero elsewhere; one that also fits another
# object ("the dog" with two dogs present) draws a mask over both, about as close to each.
DEFAULT_MARGIN = 0.1
# A negative names nothing present: kept when the verifier draws (nearly) nothing, at most this share of the image.
DEFAULT_NEGATIVE_AREA = 0.01
SEMANTIC_PREFIX = "[semantic] "  # EVF-SAM2-multitask's semantic-level mode (stuff, parts, all instances of a kind)
SEMANTIC_CATEGORIES = ("stuff", "part")


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
    """Object i, its members (a group) and the groups it belongs to: not rivals of its pair."""
    out = {i} | set(objects[i].get("members") or [])
    return out | {j for j, obj in enumerate(objects) if i in (obj.get("members") or [])}


def judge(objects: list[dict], i: int, verifier_mask: dict, params: dict) -> None:
    """The verdict on pair i of an image's objects, given the verifier's mask (RLE) for its expression.

    - ``iou``: the verifier mask against the object's own mask; ``rival_iou``: its highest IoU with any other
      masked object of the image (not its own members or groups); kept when iou >= ``threshold`` and
      iou - rival_iou >= ``margin``.
    - A negative (target absent, empty mask) is kept when ``verifier_area`` <= ``negative_area`` of the image.

    Figures are rounded to float32 first, as the output stores them, so ``kept`` always agrees with them. Masks
    of different sizes make an object-level error.
    """
    obj = objects[i]
    try:
        size = verifier_mask["size"]
        obj["verifier_area"] = rle.area(verifier_mask)
        if obj.get("category") == NEGATIVE:
            obj.update(iou=None, rival_iou=None,
                       kept=obj["verifier_area"] <= params["negative_area"] * size[0] * size[1])
            return
        value = float(np.float32(rle.iou(verifier_mask, obj["mask"])))
        own = related(objects, i)
        others = [o["mask"] for j, o in enumerate(objects) if j not in own and o.get("mask") and o.get("category") != NEGATIVE]
        rival = float(np.float32(max(rle.ious(verifier_mask, others), default=0.0)))
    except ValueError as exc:
        obj.update(iou=None, rival_iou=None, kept=False, error=f"verify: {exc}")
        return
    obj.update(iou=value, rival_iou=rival, kept=value >= params["threshold"] and value - rival >= params["margin"])


def reject_blank(obj: dict) -> None:
    obj.update(iou=None, kept=False, error="verify: blank referring expression")
