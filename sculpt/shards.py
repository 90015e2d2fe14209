"""Streaming SA-1B shard reader: tar members in, one row per image out, nothing extracted to disk.

A shard pairs ``sa_<id>.jpg`` with ``sa_<id>.json`` (names may carry ``./`` or directories). Whatever goes
wrong with one image (no partner, bad JSON, corrupt or oversized image, a tar that ends early) becomes that
image's error row and reading goes on, so every image a shard holds is accounted for exactly once.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from sculpt import images, schema
from sculpt.storage import S3Options, filesystem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
READ_BUFFER = 8 << 20  # one ranged GET per 8 MiB on S3, not per tar record


@dataclass(frozen=True)
class ReadOptions:
    batch_images: int = 16  # images per block handed to the first stage
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS
    keep_source_annotations: bool = False  # carry SA-1B's own masks (large) into `source_annotations`
    s3: S3Options = S3Options()


def shard_name(uri: str) -> str:
    """The output unit a shard becomes: its file name without the tar suffix."""
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class _CountingReader:
    """File object for tarfile that counts the bytes it hands out."""

    def __init__(self, stream):
        self.stream, self.bytes_read = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read() if size is None or size < 0 else self.stream.read(size)
        self.bytes_read += len(data)
        return data


def _member_key(name: str) -> tuple[str, str] | None:
    """('sa_1', 'image'|'json') for an SA-1B member name, None for anything else."""
    while name.startswith("./"):
        name = name[2:]
    stem, suffix = posixpath.splitext(name)
    suffix = suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return stem, "image"
    if suffix == ".json":
        return stem, "json"
    return None


def _image_row(unit: str, index: int, key: str, parts: dict, options: ReadOptions) -> dict:
    row = schema.new_row(unit, index, posixpath.basename(key), file_name=posixpath.basename(key) + ".jpg")
    if "image" not in parts:
        return schema.mark_error(row, "read", f"{key}.json has no image beside it in the shard")
    if parts["image"] is None:
        return schema.mark_error(row, "read", parts["broken"])
    if "json" not in parts:
        return schema.mark_error(row, "read", f"{key} image has no .json beside it in the shard")
    if parts["json"] is None:
        return schema.mark_error(row, "read", parts["broken"])
    try:
        meta = json.loads(parts["json"])
        info = meta["image"]
        row.update(image_id=int(info["image_id"]), file_name=info.get("file_name", row["file_name"]))
        if options.keep_source_annotations:
            row["source_annotations"] = json.dumps(meta.get("annotations", []))
    except (ValueError, KeyError, TypeError) as exc:
        return schema.mark_error(row, "read", f"{key}.json is not SA-1B image metadata ({type(exc).__name__}: {exc})")
    try:
        row["width"], row["height"] = images.upright_size(parts["image"], options.max_image_pixels)
    except images.ImageError as exc:
        return schema.mark_error(row, "read", str(exc))
    row["image_bytes"] = parts["image"]
    return row


def read_shard(uri: str, options: ReadOptions = ReadOptions()) -> Iterator[list[dict]]:
    """Yield the shard's rows in batches; the rows of the last batch carry ``shard_size`` and ``shard_bytes_read``."""
    unit = shard_name(uri)
    rows: list[dict] = []
    pending: dict[str, dict] = {}  # member key -> {"image": bytes, "json": bytes}, until both have arrived
    shard_error = None
    reader = None
    count = 0

    def add(key: str) -> None:
        nonlocal count
        rows.append(_image_row(unit, count, key, pending.pop(key), options))
        count += 1

    try:
        fs, path = filesystem(uri, options.s3)
        reader = _CountingReader(fs.open_input_stream(path, buffer_size=READ_BUFFER))
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            for member in tar:
                parsed = _member_key(member.name) if member.isfile() else None
                if parsed is None:
                    continue
                key, kind = parsed
                parts = pending.setdefault(key, {})
                try:
                    parts[kind] = tar.extractfile(member).read()
                except (tarfile.TarError, EOFError, OSError) as exc:
                    parts[kind], parts["broken"] = None, f"{member.name} cut off: {exc}"
                    raise
                if "image" in parts and "json" in parts:
                    add(key)
                    if len(rows) > options.batch_images:  # keep one back: the last batch must carry the totals
                        yield rows[:-1]
                        del rows[:-1]
    except (tarfile.TarError, EOFError, OSError) as exc:
        shard_error = f"shard {uri} ends early or is unreadable after {count} images ({type(exc).__name__}: {exc})"
    for key in list(pending):
        if shard_error and "broken" not in pending[key]:
            pending[key]["broken"] = shard_error
            pending[key].setdefault("image" if "json" in pending[key] else "json", None)
        add(key)
    if not rows:
        rows.append(schema.mark_error(schema.new_row(unit, 0, ""), "read", shard_error or f"shard {uri} holds no images"))
        count = 1
    for row in rows:
        row["shard_size"], row["shard_bytes_read"] = count, reader.bytes_read if reader else 0
    yield rows
