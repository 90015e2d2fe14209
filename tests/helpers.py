"""Builders for deliberately broken SA-1B input."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from sculpt import samples


def photo(name="chelsea"):
    return samples.photo(name)


def encoded(image: np.ndarray | Image.Image, fmt="JPEG", **options) -> bytes:
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def exif_rotated_jpeg(image: np.ndarray, orientation: int = 6) -> bytes:
    """Pixels stored as given, with an EXIF tag saying 'rotate for display'."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(image, exif=exif.tobytes())


def bomb_jpeg(width=40000, height=40000) -> bytes:
    """A tiny JPEG whose header claims width×height pixels (SOF0 patched)."""
    data = bytearray(encoded(np.zeros((8, 8, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def pair(image_id: int, image_bytes: bytes, width=8, height=8, prefix="./"):
    meta = samples.sa1b_json(image_id, np.zeros((height, width, 3), np.uint8))
    return [(f"{prefix}sa_{image_id}.jpg", image_bytes), (f"{prefix}sa_{image_id}.json", meta)]
