"""The noise filter of GSSculpt (paper section 3.4): keep a text-mask pair when the mask that a referring
segmentation model draws from the text alone overlaps the annotated mask with IoU >= a threshold (0.5).

Pure logic, no model: which objects are judged, the IoU (pycocotools, through ``sculpt.rle``) and the verdict.
The verify stage (``actors/verify.py``) runs EVF-SAM2 and hands its masks here.
"""

from __future__ import annotations

import math

import numpy as np

from sculpt import rle

DEFAULT_THRESHOLD = 0.5


def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) or not 0 <= threshold <= 1:
        raise ValueError(f"verify threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


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


def judge(obj: dict, verifier_mask: dict, threshold: float) -> None:
    """Record ``iou`` (verifier mask vs the object's mask, both RLE) and ``kept`` = iou >= threshold.

    The IoU is rounded to float32 first, as the output stores it, so ``kept`` always agrees with the written
    ``iou``. Two empty masks have IoU 0. Masks of different sizes make an object-level error.
    """
    try:
        value = float(np.float32(rle.iou(verifier_mask, obj["mask"])))
    except ValueError as exc:
        obj.update(iou=None, kept=False, error=f"verify: {exc}")
        return
    obj.update(iou=value, kept=value >= threshold)


def reject_blank(obj: dict) -> None:
    obj.update(iou=None, kept=False, error="verify: blank referring expression")
