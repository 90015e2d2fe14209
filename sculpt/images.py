"""Image decoding shared by the reader and every model stage.

Images are decoded with Pillow, turned upright by their EXIF orientation and converted to RGB (grayscale,
CMYK, palette, RGBA...). An image over ``max_pixels`` is refused from its header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # SA-1B images are ~3.4 MP; far above that is a decompression bomb


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("not a readable image: the image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own guard fires first above 2 x its limit
        raise ImageError(f"image too large: {exc}") from None
    except UnidentifiedImageError:  # its message names a BytesIO's memory address: say what the bytes are instead
        raise ImageError(f"not a readable image: no known image format in its {len(data):,} bytes "
                         f"(they start {data[:8]!r})") from None
    except Exception as exc:
        raise ImageError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"image too large: {width}x{height} = {width * height:,} pixels is over input.max_image_pixels="
            f"{max_pixels:,} (a decompression bomb guard; raise it if such images are expected)"
        )
    return image


def upright_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) after EXIF orientation, checking that the whole image decodes."""
    image = _open(data, max_pixels)
    width, height = image.size
    orientation = image.getexif().get(0x0112, 1)
    try:
        # draft() lets JPEG decode at 1/8 scale: a truncated or corrupt file still fails, at a fraction of the cost.
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
        image.load()
    except Exception as exc:
        raise ImageError(f"corrupt image data ({type(exc).__name__}: {exc})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The image as an upright H×W×3 uint8 RGB array."""
    image = _open(data, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Composite on white rather than dropping alpha, which would expose arbitrary hidden colours.
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return np.array(image.convert("RGB"))  # a writable array: torch refuses (and warns about) read-only ones
    except Exception as exc:
        raise ImageError(f"corrupt image data ({type(exc).__name__}: {exc})") from None
