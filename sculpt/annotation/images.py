"""Image decoding shared by the reader and every model stage.

Images are decoded with Pillow, turned upright by their EXIF orientation and converted to RGB (grayscale,
CMYK, palette, RGBA...). An image over ``max_pixels`` is refused from its header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import threading
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


def _plain_jpeg(data: bytes, max_pixels: int) -> bool:
    """A JPEG that needs no turning and no colour conversion (SA-1B's kind): what nvJPEG decodes as is."""
    try:
        image = _open(data, max_pixels)
    except ImageError:
        return False
    return image.format == "JPEG" and image.mode == "RGB" and image.getexif().get(0x0112, 1) == 1


_decode_streams = threading.local()  # device -> this thread's CUDA stream for nvJPEG's output


def _nvjpeg(datas: list[bytes], device):
    """nvJPEG through torchvision, on a CUDA stream of the calling thread's own.

    torchvision's decoder writes on a private stream that does not wait for the caller's (pytorch/vision#9606):
    output buffers taken from the caller's stream may be memory that another thread's queued kernels still read
    (an actor runs ``batches_in_flight`` batches at once). Allocated on a stream of their own, the buffers are
    only ever earlier decodes', each handed to the caller's stream with ``record_stream``."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    streams = _decode_streams.__dict__.setdefault("by_device", {})
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device)
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    with torch.cuda.stream(stream):
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    caller = torch.cuda.current_stream(device)
    caller.wait_stream(stream)
    for chw in decoded:
        chw.record_stream(caller)
    return [chw.permute(1, 2, 0) for chw in decoded]


def decode_on(device, datas: list[bytes], max_pixels: int = DEFAULT_MAX_PIXELS, batch_decoder=None) -> list:
    """Each image as an upright H×W×3 uint8 torch tensor on ``device``, or the ImageError that says why not.

    The plain JPEGs go to ``batch_decoder(datas, device)`` together — by default, on CUDA, nvJPEG through
    torchvision, so that neither the decode nor the copy of the pixels to the device sits on the host. Every other
    image, every image of a batch the batch decoder refuses, and on the CPU every image goes through ``load_rgb``.
    """
    import torch

    device = torch.device(device)
    if batch_decoder is None and device.type == "cuda":
        batch_decoder = _nvjpeg
    out: list = [None] * len(datas)
    batched = [i for i, data in enumerate(datas) if batch_decoder and _plain_jpeg(data, max_pixels)]
    if batched:
        try:
            for i, image in zip(batched, batch_decoder([datas[i] for i in batched], device)):
                out[i] = image
        except RuntimeError:  # one corrupt file fails the whole batch: the host decoder says which, and why
            pass
    for i, data in enumerate(datas):
        if out[i] is None:
            try:
                out[i] = torch.from_numpy(load_rgb(data, max_pixels)).to(device)
            except ImageError as exc:
                out[i] = exc
    return out


def squash(image, size: int):
    """An H×W×3 uint8 tensor resized to size×size×3 uint8 (bilinear, antialiased, on the image's device): the
    square input SAM2 takes, made where the image is, so that the model's own host transforms see a small image."""
    import torch
    import torch.nn.functional as F

    x = image.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8)
