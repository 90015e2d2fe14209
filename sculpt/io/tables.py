"""Parquet inputs: a file's rows are images, read a row group at a time (``sculpt.io.folders.read_positions``).

The image column (``Source.image_column``) holds the encoded image as bytes, a path (relative to the Parquet
file's folder, absolute, or s3://), or Hugging Face's ``Image`` struct ``{bytes, path}`` (``datasets``'
``to_parquet`` writes it so); ``Source.id_column`` names each image (its ``image_key``; an integer id is also its
``image_id``), and without one an image is named by its row's position in its file. A position is a row group: a
chunk is as many whole row groups as make ``chunk_images`` rows, and a resume opens the file's footer and reads
only the row groups of uncommitted chunks.

pyarrow raises OSError both for a store's fault and for bytes it cannot decode; ``decoded`` tells them apart by
whether a read of the file failed. A row group that cannot be decoded is its images' error rows (the file's other row
groups are read), a footer that cannot be decoded the file's error row; a store's fault is retried, then pending.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import pyarrow.parquet as pq

from sculpt import errors
from sculpt.io import storage
from sculpt.io.folders import Entry, Positions, read_positions, retried
from sculpt.io.shards import Position, ReadOptions, Segment
from sculpt.io.storage import S3Options


class _Counted(storage.CountingReader):
    """A file for pyarrow.parquet that counts what it reads (a file object as Python's io has them), and keeps the
    fault of a read that failed (``decoded``)."""

    closed = property(lambda self: self.stream.closed)
    failed: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            return super().read(size)
        except Exception as exc:
            self.failed = exc
            raise

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def size(self) -> int:
        return self.stream.size()

    def close(self) -> None:
        self.stream.close()


def open_parquet(uri: str, s3: S3Options) -> tuple[pq.ParquetFile, storage.CountingReader]:
    """The file (its footer read) and the counter of the bytes read from it."""
    fs, path = storage.filesystem(uri, s3)
    stream = _Counted(fs.open_input_file(path))
    return decoded(stream, lambda: pq.ParquetFile(stream), f"{uri}'s footer"), stream


def decoded(stream: _Counted, call, what: str):
    """``call()``, pyarrow decoding what it reads from ``stream``. pyarrow raises OSError both for a fault of the
    store and for bytes it cannot decode: one raised while every read of the stream succeeded is about the bytes
    (a corrupt page or footer), ``errors.Undecodable``; a read's own fault is raised as it is."""
    stream.failed = None
    try:
        return call()
    except OSError as exc:
        if stream.failed is not None:
            raise
        raise errors.Undecodable(f"{what} cannot be decoded ({errors.describe(exc)})") from exc


def check_columns(uri: str, source, s3: S3Options) -> None:
    """Refuse, before the job starts, an input whose (first) file lacks the image or id column."""
    with errors.at_job_level(uri):
        try:
            file, stream = open_parquet(uri, s3)
            names = file.schema_arrow.names
            stream.close()
        except (ValueError, OSError) as exc:
            if errors.classify(exc, uri, reading=True) is errors.TRANSIENT and not isinstance(exc, ValueError):
                raise
            raise errors.BadInput(f"{uri} is not a readable Parquet file ({errors.describe(exc)}); check "
                                  "input.shards") from None
    for what, column in (("image_column", source.image_column), ("id_column", source.id_column)):
        if column is not None and column not in names:
            raise errors.BadInput(f"input.{what}={column!r}: {uri} has no such column (it has {', '.join(names)}); "
                                  f"set input.{what}")


class ParquetRows(Positions):
    def __init__(self, segment: Segment, options: ReadOptions):
        self.uri, self.s3, self.source = segment.uri, options.s3, options.source
        self.file = self.stream = None
        self.starts: list[int] = []  # each row group's first row in the file

    @property
    def bytes_read(self) -> int:
        return self.stream.bytes_read if self.stream else 0

    def open(self) -> int:
        self.file, self.stream = open_parquet(self.uri, self.s3)
        names = self.file.schema_arrow.names
        for column in (self.source.image_column, self.source.id_column):
            if column is not None and column not in names:
                raise KeyError(f"{self.uri} has no column {column!r} (it has {', '.join(names)})")
        meta, row = self.file.metadata, 0
        for group in range(meta.num_row_groups):
            self.starts.append(row)
            row += meta.row_group(group).num_rows
        return meta.num_row_groups

    def size(self, position: int) -> int:
        return self.file.metadata.row_group(position).num_rows

    def entries(self, position: int) -> list[Entry]:
        columns = [c for c in (self.source.image_column, self.source.id_column) if c is not None]
        table = decoded(self.stream, lambda: self.file.read_row_group(position, columns=list(dict.fromkeys(columns))),
                        f"row group {position} of {self.uri}")
        values = table.column(self.source.image_column).to_pylist()
        first = self.starts[position]
        ids = (table.column(self.source.id_column).to_pylist() if self.source.id_column
               else range(first, first + len(values)))
        return [self._entry(value, name) for value, name in zip(values, ids)]

    def _entry(self, value, name) -> Entry:
        data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (
            (value, None) if isinstance(value, (bytes, bytearray)) else (None, value))
        key = "" if name is None else str(name)
        fields = {"file_name": path or f"{key}.jpg",
                  "image_id": name if isinstance(name, int) and not isinstance(name, bool) else None}
        if data is not None or not path:
            return key, fields, lambda: None if data is None else bytes(data)
        return key, fields, lambda: self._read(path)

    def _read(self, path: str) -> bytes:
        if not (storage.is_s3(path) or path.startswith("/")):
            path = storage.join(posixpath.dirname(self.uri), path)
        fs, inner = storage.filesystem(path, self.s3)
        with fs.open_input_stream(inner) as f:
            return f.read()


def read_segment(segment: Segment, options: ReadOptions, before_chunk=None) -> Iterator[list[dict]]:
    yield from read_positions(segment, options, before_chunk, ParquetRows(segment, options))


def split(segment: Segment, options: ReadOptions) -> list[Segment]:
    """One segment per chunk, its row groups found from the file's footer (no row group read)."""
    if segment.only:
        return [segment]
    try:
        meta = retried(lambda: open_parquet(segment.uri, options.s3)[0].metadata, segment.uri, options)
    except Exception:
        return [segment]  # the reader meets the same fault, and accounts for it
    start = segment.start or Position()
    end = meta.num_row_groups if segment.stop_offset is None else min(meta.num_row_groups, segment.stop_offset)
    chunk, pos, index, starts = start.chunk, start.offset, start.index, []
    while pos < end and (segment.stop is None or chunk < segment.stop):
        starts.append(Position(chunk, pos, pos, index))
        first = index
        while pos < end and index - first < segment.chunk_images:
            index, pos = index + meta.row_group(pos).num_rows, pos + 1
        chunk += 1
    if len(starts) <= 1:
        return [segment]
    ends = [(p.chunk, p.offset) for p in starts[1:]] + [(segment.stop, segment.stop_offset)]
    return [Segment(segment.uri, segment.chunk_images, p, *stop) for p, stop in zip(starts, ends)]
