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
from collections.abc import Iterator
import dataclasses
import io
from dataclasses import dataclass

from sculpt import errors, schema
from sculpt.annotation import images
from sculpt.io.exclude import Exclusions
from sculpt.io.storage import SHARD_SUFFIXES, CountingReader, S3Options, filesystem, is_s3

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
    exclude: Exclusions = Exclusions()  # images skipped unread: no row, counted in unit_end (``excluded_of``)
    source: object = None  # sculpt.io.inputs.Source: another kind of input than SA-1B tars (None: SA-1B)


def shard_name(uri: str) -> str:
    """The output unit a shard becomes: its file name without the tar suffix."""
    name = posixpath.basename(uri.rstrip("/"))
    for suffix in (*SHARD_SUFFIXES, ".parquet"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# What the store and tarfile raise while a shard is read; ``sculpt.errors.RULES`` (reading) tells what each is.
READ_FAULTS = (OSError, tarfile.TarError, EOFError)


class _Range(io.RawIOBase):
    """A file's bytes from where it stands up to ``end`` (None: its end), not one byte further, even buffered."""

    def __init__(self, raw, end: int | None):
        self.raw, self.end = raw, end

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer) -> int:
        size = len(buffer) if self.end is None else max(0, min(len(buffer), self.end - self.raw.tell()))
        data = self.raw.read(size) if size else b""
        buffer[: len(data)] = data
        return len(data)


def _open_at(uri: str, offset: int, s3, end: int | None = None) -> tuple[object, int]:
    """(buffered stream of the bytes from ``offset`` to ``end``, file size): one ranged read per READ_BUFFER on S3."""
    fs, path = filesystem(uri, s3)
    raw = fs.open_input_file(path)
    size = raw.size()
    raw.seek(offset)
    return io.BufferedReader(_Range(raw, end), buffer_size=READ_BUFFER), size


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


def _image_row(shard: str, unit: str, index: int, key: str, parts: dict, options: ReadOptions) -> dict:
    row = schema.new_row(shard, index, posixpath.basename(key), unit=unit, file_name=posixpath.basename(key) + ".jpg",
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


@dataclass(frozen=True)
class Segment:
    """Where a reader starts in a shard and where it stops: consecutive chunks of it.

    A chunk is the output unit: ``chunk_images`` images (a few more when an image's members straddle the cut),
    ``{shard}-{chunk:05d}``. Chunk 0 starts at the tar's beginning; every later one where its predecessor's marker
    says (``Position``), so a resume seeks there (a ranged read on S3) and never reads a committed chunk's bytes.
    """

    uri: str
    chunk_images: int = 1000
    start: "Position" = None  # where the first chunk to read begins; None: the tar's beginning, chunk 0
    stop: int | None = None  # chunk to stop before (the next committed one); None: read to the shard's end
    stop_offset: int | None = None  # where that chunk begins (uncompressed tars): no byte from there on is read
    only: dict[int, list[int]] | None = None  # chunk -> the indices to read (a redo of error rows); others skipped
    files: list[str] | None = None  # a folder of images: its recorded listing from start.offset on (io/folders.py)

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "only": {str(k): v for k, v in (self.only or {}).items()} or None})

    @classmethod
    def from_json(cls, text: str) -> "Segment":
        fields = json.loads(text)
        only = {int(k): v for k, v in fields.pop("only").items()} if fields["only"] else None
        start = Position(**fields.pop("start")) if fields["start"] else None
        return cls(**{k: v for k, v in fields.items() if k not in ("only", "start")}, start=start, only=only)


@dataclass(frozen=True)
class Position:
    """The start of a chunk: its number, the tar offset of its first member, the members and images before it."""

    chunk: int = 0
    offset: int = 0  # uncompressed tars: a reader seeks here
    members: int = 0  # compressed tars: a reader streams from the beginning and skips this many members
    index: int = 0  # the chunk's first image's index in the shard


def unit_name(shard: str, chunk: int) -> str:
    return f"{shard}-{chunk:05d}"


def excluded_of(end: dict | None) -> int:
    """A unit's images skipped by an exclusion list, from its ``unit_end``: its images less the rows it yields."""
    if not end or end.get("next_index") is None or end.get("index") is None:
        return 0
    return max(0, end["next_index"] - end["index"] - end["size"])


def parse_unit(unit: str) -> tuple[str, int]:
    """('sa_000000', 3) for 'sa_000000-00003'; a name without a chunk number is a whole shard, its chunk 0."""
    match = re.fullmatch(r"(.+)-(\d{5,})", unit)
    return (match.group(1), int(match.group(2))) if match else (unit, 0)


def read_shard(uri: str, options: ReadOptions = ReadOptions(), only: set[int] | None = None) -> Iterator[list[dict]]:
    """The whole shard as one unit (tools and tests); the pipeline reads ``Segment``s with ``read_segment``."""
    yield from read_segment(Segment(uri, chunk_images=1 << 62, only=None if only is None else {0: sorted(only)}), options)


def read_segment(segment: Segment, options: ReadOptions = ReadOptions(), before_chunk=None) -> Iterator[list[dict]]:
    """Yield the segment's rows in batches, one unit (chunk) at a time; a chunk's last batch carries its ``unit_end``.

    ``before_chunk(unit)`` is called before a chunk's first byte is read (the job's count of chunks in flight).

    A transient fault of the store (``sculpt.errors.RULES``: a connection reset, throttling that outlasts the S3
    client's own retries) reopens the tar where the last whole member ended (a ranged read; compressed tars start
    over and skip what was read): ``errors.retrying_stream``, ``options.read_attempts`` opens in all. A shard
    still unreadable then yields one row whose ``transient_error`` says why: its chunk is not committed and stays
    pending. A tar that is itself cut short is data: its images up to the cut are kept and the rest become error
    rows; so is a shard missing or forbidden from its start (one that was readable before leaves its chunk pending).
    """
    yield from _SegmentReader(segment, options, before_chunk).batches()


class _SegmentReader:
    """One read of a segment: the chunk being read, where a reopened stream resumes, and the rows not yet yielded."""

    def __init__(self, segment: Segment, options: ReadOptions, before_chunk):
        self.segment, self.options, self.before_chunk = segment, options, before_chunk
        self.uri, self.start = segment.uri, segment.start or Position()
        self.shard, self.compressed = shard_name(self.uri), not self.uri.endswith(".tar")
        self.only = segment.only or {}
        self.rows: list[dict] = []
        self.pending: dict[str, dict] = {}  # member key -> {"image": bytes, "json": bytes}, until both have arrived
        self.shard_error: str | None = None
        start = self.start
        self.chunk, self.first, self.count = start.chunk, start.index, start.index  # its first image's index, images so far
        self.excluded = 0  # the chunk's images skipped by options.exclude: they keep their index, and have no row
        self.resume_at, self.members_done = start.offset, start.members  # where a reopened stream starts; members consumed
        self.bytes_read = self.chunk_bytes = 0  # bytes read in all; at this chunk's start
        self.chunk_offset, self.chunk_members = start.offset, start.members  # where this chunk began

    def batches(self) -> Iterator[list[dict]]:
        if self.before_chunk:
            self.before_chunk(unit_name(self.shard, self.chunk))
        uri, options = self.uri, self.options
        try:
            # a store fault reopens the stream where it broke (errors.retrying_stream); what the table does not retry
            # comes here
            if (yield from errors.retrying_stream(self._read_on, options.read_attempts, options.retry_backoff,
                                                  store=uri, reading=True)):
                return
        except READ_FAULTS as exc:
            kind = errors.classify(exc, uri, reading=True)
            if kind is errors.TRANSIENT:  # past its reopens
                yield self._given_up(f"read: shard {uri} still failed after {options.read_attempts} attempts, "
                                     f"{self.count} images in ({errors.describe(exc)})")
                return
            if kind is not errors.PERMANENT:
                raise
            if not isinstance(exc, OSError):  # the tar is cut short or corrupt: data
                self.shard_error = (f"shard {uri} ends early or is unreadable after {self.count} images "
                                    f"({type(exc).__name__}: {exc})")
            # missing or forbidden, but readable before (a resume, a redo, a chunk that split found, or images in):
            # a fault, not data
            elif (self.start.chunk or self.count > self.start.index or self.segment.only
                  or self.segment.stop_offset is not None):
                yield self._given_up(f"read: shard {uri} became unreadable after {self.count} images "
                                     f"({errors.describe(exc)})")
                return
            else:
                self.shard_error = f"shard {uri} is unreadable ({type(exc).__name__}: {exc})"
        for key in list(self.pending):
            if self.shard_error and "broken" not in self.pending[key]:
                self.pending[key]["broken"] = self.shard_error
                self.pending[key].setdefault("image" if "json" in self.pending[key] else "json", None)
            self._add(key)
        # a segment that ends where a committed chunk begins does not end the shard
        yield self._end_chunk(self.segment.stop_offset is None or self.compressed or bool(self.shard_error),
                              self.bytes_read)

    def _read_on(self) -> Iterator[list[dict]]:
        """One open of the tar, from where the last one broke; returns True once the segment's stop is reached."""
        reader = None
        try:
            stream, size = _open_at(self.uri, 0 if self.compressed else self.resume_at, self.options.s3,
                                    None if self.compressed else self.segment.stop_offset)
            if not self.compressed and self.resume_at and self.resume_at >= size:
                return False
            # a local tar with an exclusion list is read seekable: an excluded member's data is seeked past, unread
            seek = bool(self.options.exclude) and not self.compressed and not is_s3(self.uri)
            base, skip = (0, self.members_done) if self.compressed else (0 if seek else self.resume_at, 0)
            reader = CountingReader(stream)
            with tarfile.open(fileobj=reader, mode="r:" if seek else "r|*") as tar:
                for member in tar:
                    if skip:
                        skip -= 1
                        continue
                    parsed = self._parse(member)
                    for key in self._ready_before(parsed[0]) if parsed else ():
                        self._add(key)
                    if parsed is not None and self.count - self.first >= self.segment.chunk_images and not self.pending:
                        yield self._end_chunk(False, self.bytes_read + reader.bytes_read)  # this member starts the next
                        if self.chunk == self.segment.stop:
                            return True
                        if self.before_chunk:
                            self.before_chunk(unit_name(self.shard, self.chunk))
                    if parsed is not None:
                        self._take(tar, member, *parsed)
                    self.members_done += 1
                    self.resume_at = base + member.offset_data + _padded(member.size)
                    if parsed is not None and self._complete(parsed[0]):
                        self._add(parsed[0])
                    if len(self.rows) > self.options.batch_images:  # one kept back: the last carries the end
                        yield self.rows[:-1]
                        del self.rows[:-1]
            return False
        finally:
            self.bytes_read += reader.bytes_read if reader else 0

    def _take(self, tar: tarfile.TarFile, member: tarfile.TarInfo, key: str, kind: str) -> None:
        """Keep a member's bytes until its image or json partner arrives; a member cut off is marked broken. An
        excluded image's members are never read (a streamed tar passes over their data, a local one seeks past it)."""
        parts = self.pending.setdefault(key, {})
        if self.options.exclude.matches(key):
            parts["excluded"], parts[kind] = True, None
            return
        try:
            parts[kind] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError) as exc:
            parts[kind], parts["broken"] = None, f"{member.name} cut off: {exc}"
            raise

    def _add(self, key: str) -> None:
        parts = self.pending.pop(key)
        if parts.get("excluded"):
            self.excluded += 1
        elif self.chunk not in self.only or self.count in self.only[self.chunk]:
            self.rows.append(self._row(key, parts))
        self.count += 1

    # What a member is and when an image is whole: SA-1B's layout (io/webdataset.py has another)
    def _parse(self, member: tarfile.TarInfo) -> tuple[str, str] | None:
        return _member_key(member.name) if member.isfile() else None

    def _ready_before(self, key: str) -> list[str]:  # images whole once a member of ``key`` arrives
        return []

    def _complete(self, key: str) -> bool:
        return "image" in self.pending[key] and "json" in self.pending[key]

    def _row(self, key: str, parts: dict) -> dict:
        return _image_row(self.shard, unit_name(self.shard, self.chunk), self.count, key, parts, self.options)

    def _end_chunk(self, last: bool, read: int) -> list[dict]:
        if not self.rows and self.count == self.first:  # a shard (or what is left of one) without images: one row
            self.rows.append(schema.mark_error(schema.new_row(self.shard, self.first, "",
                                                              unit=unit_name(self.shard, self.chunk)), "read",
                                               self.shard_error or f"shard {self.uri} holds no images"))
        elif not self.rows:  # every image excluded: a row that only carries the end (the writer drops index -1)
            self.rows.append(schema.new_row(self.shard, -1, "", unit=unit_name(self.shard, self.chunk),
                                            status=schema.ERROR, error="read: every image of the chunk is excluded"))
        size = self.count - self.first - self.excluded if self.count > self.first else 1  # the rows it yields
        end = {"size": size, "bytes_read": read - self.chunk_bytes,
               "offset": self.chunk_offset, "members": self.chunk_members, "index": self.first,
               "next_offset": self.resume_at, "next_members": self.members_done,
               "next_index": max(self.count, self.first + 1), "last": last}
        for row in self.rows:
            row["unit_end"] = end
        done, self.rows = self.rows, []
        self.chunk, self.first, self.chunk_bytes, self.excluded = self.chunk + 1, self.count, read, 0
        self.chunk_offset, self.chunk_members = self.resume_at, self.members_done
        return done

    def _given_up(self, failure: str) -> list[dict]:
        """One row that leaves the chunk pending."""
        return [schema.new_row(self.shard, -1, "", unit=unit_name(self.shard, self.chunk), status=schema.ERROR,
                               error=failure, transient_error=failure)]


def _members_before(tar: tarfile.TarFile, stop_offset: int | None) -> Iterator[tarfile.TarInfo]:
    """The tar's members up to ``stop_offset``, where a committed chunk begins: its header is not read."""
    member = tar.next()
    while member is not None:
        yield member
        if stop_offset is not None and tar.offset >= stop_offset:
            return
        member = tar.next()


def split(segment: Segment) -> list[Segment]:
    """The segment as one segment per chunk, so that its chunks are read in parallel — where the input allows.

    A local uncompressed tar's member headers are found by seeking from header to header (no image byte read),
    which tells where each chunk begins. Compressed tars, S3 objects (a ranged read per header would cost more
    than it saves) and tars that end early stay one segment, read in order.
    """
    if is_s3(segment.uri) or not segment.uri.endswith(".tar") or segment.only:
        return [segment]
    start = segment.start or Position()
    starts, first, count, members = [start], start.index, start.index, start.members
    pending: dict[str, set[str]] = {}  # as the reader pairs members: key -> kinds seen
    try:
        with open(segment.uri, "rb", buffering=0) as f:  # unbuffered: no read-ahead into a committed chunk
            f.seek(start.offset)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for member in _members_before(tar, segment.stop_offset):
                    parsed = _member_key(member.name) if member.isfile() else None
                    if parsed is not None:
                        if count - first >= segment.chunk_images and not pending:
                            if len(starts) == (segment.stop or 1 << 62) - start.chunk:
                                break
                            first = count
                            starts.append(Position(start.chunk + len(starts), member.offset, members, count))
                        key, kind = parsed
                        pending.setdefault(key, set()).add(kind)
                        if len(pending[key]) == 2:
                            del pending[key]
                            count += 1
                    members += 1
    except (OSError, tarfile.TarError, EOFError):
        return [segment]  # the reader meets the same fault and accounts for it
    ends = [(p.chunk, p.offset) for p in starts[1:]] + [(segment.stop, segment.stop_offset)]
    return [Segment(segment.uri, segment.chunk_images, p, *end) for p, end in zip(starts, ends)]
