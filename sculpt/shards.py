"""Streaming SA-1B shard reader: tar members in, one row per image out, nothing extracted to disk.

A shard pairs ``sa_<id>.jpg`` with ``sa_<id>.json`` (names may carry ``./`` or directories). Whatever goes
wrong with one image (no partner, bad JSON, corrupt or oversized image, a tar that ends early) becomes that
image's error row and reading goes on, so every image a shard holds is accounted for exactly once.
"""

from __future__ import annotations

import json
import posixpath
import re
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from sculpt import errors, images, schema
from sculpt.storage import S3Options, filesystem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
READ_BUFFER = 8 << 20  # one ranged GET per 8 MiB on S3, not per tar record


@dataclass(frozen=True)
class ReadOptions:
    batch_images: int = 16  # images per block handed to the first stage
    max_image_pixels: int = images.DEFAULT_MAX_PIXELS
    keep_source_annotations: bool = False  # carry SA-1B's own masks (large) into `source_annotations`
    s3: S3Options = S3Options()
    read_attempts: int = 5  # opens of a shard's stream, each after a storage fault, before the shard is left pending
    retry_backoff: float = 1.0  # seconds before the first reopen; doubles each time


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


# Faults of the storage, not of the shard: a retry that reopens the stream may get past them. A missing or
# forbidden file is not one of them.
PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _open_at(uri: str, offset: int, s3) -> tuple[object, int]:
    """(buffered stream positioned at ``offset``, file size): one ranged read per READ_BUFFER bytes on S3."""
    import pyarrow as pa

    fs, path = filesystem(uri, s3)
    raw = fs.open_input_file(path)
    size = raw.size()
    raw.seek(offset)
    return pa.BufferedInputStream(raw, buffer_size=READ_BUFFER), size


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


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


def image_id_of(key: str) -> int | None:
    """SA-1B's image id from a member name (``sa_223750`` -> 223750), so that even an error row says which image."""
    match = re.fullmatch(r"sa_(\d+)", posixpath.basename(key))
    return int(match.group(1)) if match else None


def _image_row(unit: str, index: int, key: str, parts: dict, options: ReadOptions) -> dict:
    row = schema.new_row(unit, index, posixpath.basename(key), file_name=posixpath.basename(key) + ".jpg",
                         image_id=image_id_of(key))
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


def read_shard(uri: str, options: ReadOptions = ReadOptions(), only: set[int] | None = None) -> Iterator[list[dict]]:
    """Yield the shard's rows in batches; the rows of the last batch carry ``shard_size`` and ``shard_bytes_read``.

    ``only``: yield just the images at these indices (a redo of a committed unit's error rows).

    A storage fault (connection reset, throttling that outlasts the S3 client's own retries) reopens the tar
    where the last whole member ended (a ranged read; compressed tars start over and skip what was read), up to
    ``options.read_attempts`` times. A shard still unreadable then yields one row whose ``transient_error`` says
    why: its unit is not committed and stays pending. A tar that is itself cut short is data: its images up to
    the cut are kept and the rest become error rows.
    """
    unit = shard_name(uri)
    rows: list[dict] = []
    pending: dict[str, dict] = {}  # member key -> {"image": bytes, "json": bytes}, until both have arrived
    shard_error = None
    count = 0
    bytes_read = 0
    resume_at = 0  # tar offset after the last whole member (uncompressed tars), where a reopened stream starts
    members_done = 0  # members consumed so far (compressed tars skip these after a reopen)
    compressed = not uri.endswith(".tar")

    def add(key: str) -> None:
        nonlocal count
        parts = pending.pop(key)
        if only is None or count in only:
            rows.append(_image_row(unit, count, key, parts, options))
        count += 1

    for attempt in range(options.read_attempts):
        reader = None
        try:
            stream, size = _open_at(uri, 0 if compressed else resume_at, options.s3)
            if not compressed and resume_at and resume_at >= size:
                break
            base, skip = (0, members_done) if compressed else (resume_at, 0)
            reader = _CountingReader(stream)
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                for member in tar:
                    if skip:
                        skip -= 1
                        continue
                    parsed = _member_key(member.name) if member.isfile() else None
                    if parsed is not None:
                        key, kind = parsed
                        try:
                            data = tar.extractfile(member).read()
                        except (tarfile.TarError, EOFError) as exc:
                            parts = pending.setdefault(key, {})
                            parts[kind], parts["broken"] = None, f"{member.name} cut off: {exc}"
                            raise
                        pending.setdefault(key, {})[kind] = data
                    members_done += 1
                    resume_at = base + member.offset_data + _padded(member.size)
                    if parsed is not None and "image" in pending[key] and "json" in pending[key]:
                        add(key)
                        if len(rows) > options.batch_images:  # keep one back: the last batch must carry the totals
                            yield rows[:-1]
                            del rows[:-1]
            break
        except PERMANENT_OS_ERRORS as exc:
            shard_error = f"shard {uri} is unreadable ({type(exc).__name__}: {exc})"
            break
        except (tarfile.TarError, EOFError) as exc:
            shard_error = f"shard {uri} ends early or is unreadable after {count} images ({type(exc).__name__}: {exc})"
            break
        except OSError as exc:
            if attempt == options.read_attempts - 1:
                failure = (f"read: shard {uri} still failed after {options.read_attempts} attempts, {count} images in "
                           f"({errors.describe(exc)})")
                yield [schema.new_row(unit, -1, "", status=schema.ERROR, error=failure, transient_error=failure)]
                return
            time.sleep(options.retry_backoff * 2**attempt)
        finally:
            bytes_read += reader.bytes_read if reader else 0
    for key in list(pending):
        if shard_error and "broken" not in pending[key]:
            pending[key]["broken"] = shard_error
            pending[key].setdefault("image" if "json" in pending[key] else "json", None)
        add(key)
    if not rows and count == 0:
        rows.append(schema.mark_error(schema.new_row(unit, 0, ""), "read", shard_error or f"shard {uri} holds no images"))
        count = 1
    for row in rows:
        row["shard_size"], row["shard_bytes_read"] = count, bytes_read
    yield rows
