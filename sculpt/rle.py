"""COCO run-length encoding of binary masks, always through pycocotools.

A mask travels and is stored as ``{"size": [height, width], "counts": str}`` — COCO's compressed RLE with
``counts`` as text, which is exactly what SA-1B's JSON holds and what ``pycocotools.mask.decode`` takes.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


def encode(mask: np.ndarray) -> dict:
    """One H×W boolean (or 0/1) mask -> ``{"size": [H, W], "counts": str}``."""
    if mask.ndim != 2:
        raise ValueError(f"encode takes one H×W mask, got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode_many(masks: np.ndarray) -> list[dict]:
    """N×H×W masks -> N RLEs, in one pycocotools call."""
    if masks.ndim != 3:
        raise ValueError(f"encode_many takes N×H×W masks, got shape {masks.shape}")
    rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in rles]


def _coco(rle: dict) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode(rle: dict) -> np.ndarray:
    """RLE -> H×W bool mask."""
    return coco_mask.decode(_coco(rle)).astype(bool)


def area(rle: dict) -> int:
    return int(coco_mask.area(_coco(rle)))


def iou(a: dict, b: dict) -> float:
    """Intersection over union of two masks of the same image. Two empty masks have IoU 0."""
    if list(a["size"]) != list(b["size"]):
        raise ValueError(f"masks of different sizes: {a['size']} vs {b['size']}")
    return float(coco_mask.iou([_coco(a)], [_coco(b)], [0])[0][0])
