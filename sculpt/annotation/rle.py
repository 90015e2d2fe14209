"""COCO run-length encoding of binary masks, always through pycocotools.

A mask travels and is stored as ``{"size": [height, width], "counts": str}`` — COCO's compressed RLE with
``counts`` as text, which is exactly what SA-1B's JSON holds and what ``pycocotools.mask.decode`` takes.

``encode_tensors`` is the path for masks that are torch tensors (on a GPU, or the CPU): the run lengths are
counted with torch where the masks are, only those small arrays cross to the host, and pycocotools compresses
them — the same bytes as ``pycocotools.mask.encode``. torch is imported only there: ``import sculpt.annotation.rle`` stays
free of it.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


def _text(rle: dict) -> dict:
    """pycocotools' RLE (counts as bytes, size as numpy ints) as sculpt stores it."""
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def encode(mask: np.ndarray) -> dict:
    """One H×W boolean (or 0/1) mask -> ``{"size": [H, W], "counts": str}``."""
    if mask.ndim != 2:
        raise ValueError(f"encode takes one H×W mask, got shape {mask.shape}")
    return _text(coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8)))


def encode_many(masks: np.ndarray) -> list[dict]:
    """N×H×W masks -> N RLEs, in one pycocotools call."""
    if masks.ndim != 3:
        raise ValueError(f"encode_many takes N×H×W masks, got shape {masks.shape}")
    return [_text(r) for r in coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))]


def encode_tensors(masks, chunk: int = 8) -> list[dict]:
    """N×H×W masks as a torch tensor (bool, or 0/1), on any device -> N RLEs, exactly as ``encode_many`` gives.

    The masks are never copied to the host: ``run_lengths`` counts their runs on their device, ``chunk`` masks at
    a time (its temporary is about one bool per pixel of a chunk), and pycocotools compresses the counts.
    """
    if masks.ndim != 3:
        raise ValueError(f"encode_tensors takes N×H×W masks, got shape {tuple(masks.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    height, width = int(masks.shape[1]), int(masks.shape[2])
    out = []
    for i in range(0, int(masks.shape[0]), chunk):
        runs = [{"size": [height, width], "counts": counts} for counts in run_lengths(masks[i:i + chunk])]
        out += [_text(r) for r in coco_mask.frPyObjects(runs, height, width)]
    return out


def run_lengths(masks) -> list[np.ndarray]:
    """N×H×W torch masks -> N arrays of COCO's uncompressed RLE counts, computed with torch on the masks' device.

    COCO reads a mask column by column (the H×W mask transposed, flattened) and counts alternating runs, zeros
    first: a mask that starts with a one has a first run of 0. A run ends where a pixel differs from the one
    before it in that order (before the first pixel stands a 0), so the runs are the gaps between those change
    positions, and the last run reaches the end of the mask. Only the runs (one int per change) go to the host,
    in one copy.
    """
    import torch

    n, height, width = (int(d) for d in masks.shape)
    area = height * width
    if n == 0:
        return []
    if area == 0:
        return [np.zeros(1, dtype=np.int64) for _ in range(n)]
    if masks.dtype != torch.bool:
        masks = masks != 0
    cols = _changes(masks)  # r * area + column-major index of every change, ascending
    rows = torch.div(cols, area, rounding_mode="floor")
    cols -= rows * area
    changes = torch.bincount(rows, minlength=n)  # per mask; a mask has changes + 1 runs
    ends = torch.cumsum(changes, 0)
    # Change t of mask r ends run t + r of the flat output (each mask before r added one more, its last run);
    # that run is the gap from the mask's previous change (or its first pixel).
    previous = torch.zeros_like(cols)
    previous[1:] = cols[:-1]
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    previous.masked_fill_(first, 0)
    runs = torch.empty(len(cols) + n, dtype=torch.int64, device=masks.device)
    runs[torch.arange(len(cols), device=masks.device) + rows] = cols - previous
    # The last run of mask i goes from its last change (or 0 when it has none) to its end.
    last = torch.cat([cols.new_zeros(1), cols])[ends]  # cols[ends - 1]; when the mask has none, not its own
    runs[ends + torch.arange(n, device=masks.device)] = area - torch.where(changes > 0, last, 0)
    host = torch.cat([changes, runs]).cpu().numpy()
    return np.split(host[n:], np.cumsum(host[:n] + 1)[:-1])


def _changes(masks):
    """Where N×H×W bool masks change in COCO's column-major order, as sorted keys mask * H·W + x·H + y.

    Computed in the masks' own (row-major) layout, with no transposed copy: pixel (y, x) follows (y - 1, x), and
    the top of a column follows the bottom of the previous one. The change map is searched a word (8 pixels) at
    a time first, then inside the words that hold a change; the few changes found are then sorted column-major.
    """
    import torch

    n, height, width = masks.shape
    area, total = height * width, n * height * width
    scratch = torch.empty((total + 7) // 8 * 8, dtype=torch.bool, device=masks.device)
    scratch[total:] = False
    change = scratch[:total].view(n, height, width)
    torch.ne(masks[:, 1:], masks[:, :-1], out=change[:, 1:])
    torch.ne(masks[:, 0, 1:], masks[:, -1, :-1], out=change[:, 0, 1:])
    change[:, 0, 0] = masks[:, 0, 0]  # the first pixel follows a 0
    words = scratch.view(torch.int64).nonzero()[:, 0]
    word, bit = scratch.view(-1, 8)[words].nonzero(as_tuple=True)
    flat = words[word] * 8 + bit  # row-major positions of the changes
    del scratch, change, words, word, bit
    mask = torch.div(flat, area, rounding_mode="floor")
    y = torch.div(flat - mask * area, width, rounding_mode="floor")
    x = flat - mask * area - y * width
    return torch.sort(mask * area + x * height + y).values


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


def union(rles: list[dict]) -> dict:
    """The union of masks of one image (pycocotools' merge)."""
    if len({tuple(r["size"]) for r in rles}) != 1:
        raise ValueError(f"union needs masks of one size, got {[list(r['size']) for r in rles]}")
    return _text(coco_mask.merge([_coco(r) for r in rles], intersect=False))


def empty(height: int, width: int) -> dict:
    """The RLE of an all-zero H×W mask."""
    return _text(coco_mask.frPyObjects([{"size": [height, width], "counts": [height * width]}], height, width)[0])


def ious(a: dict, others: list[dict]) -> list[float]:
    """IoU of one mask with each of several masks of the same image."""
    if not others:
        return []
    return [float(v) for v in coco_mask.iou([_coco(a)], [_coco(o) for o in others], [0] * len(others))[0]]
