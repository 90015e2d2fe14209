"""Inputs read by position (a folder's listed files, a Parquet file's row groups): chunks of positions, each of at
least ``chunk_images`` images (a position may hold several: a row group), cut where a position begins.

``read_positions`` is the one reader of both kinds: a chunk's ``unit_end`` says where it begins and ends in
positions (``offset``/``next_offset``; ``members`` the same), so that planning resumes it from its markers as it
resumes a tar, and a resume reads no position of a committed chunk. A store's transient fault is retried
(``input``'s ``read_attempts``), then leaves the chunk pending; an image that cannot be read or decoded is its
error row, and so is each image of a position that cannot be (a corrupt Parquet row group). The folder kind lives
here too: ``Segment.files`` carries its part of the recorded listing (``sculpt.io.inputs``).
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable, Iterator

from sculpt import errors, schema
from sculpt.annotation import images
from sculpt.io import storage
from sculpt.io.shards import Position, ReadOptions, Segment, shard_name, unit_name

Entry = tuple  # (image_key, row fields, load() -> the image's bytes or None)


class GiveUp(Exception):
    """The chunk is left pending: a store's fault outlasted its retries (or a shard readable before is not now)."""


def _fault(exc: BaseException, uri: str) -> bool:
    """Whether a read's exception is a transient fault of the store (else it is about the data: permanent)."""
    if isinstance(exc, (OSError, EOFError, tarfile.TarError)):
        return errors.classify(exc, uri, reading=True) is errors.TRANSIENT
    if isinstance(exc, (ValueError, KeyError, TypeError, IndexError)):
        return False  # pyarrow's ArrowInvalid, a value of the wrong type: the data
    raise exc


def retried(call: Callable, uri: str, options: ReadOptions):
    """``call()`` with the store's transient faults retried; ``GiveUp`` once they outlast the attempts."""
    try:
        return errors.retrying(call, options.read_attempts, options.retry_backoff, store=uri, reading=True)
    except GiveUp:
        raise
    except Exception as exc:
        if _fault(exc, uri):
            raise GiveUp(f"read: {uri} still failed after {options.read_attempts} attempts "
                         f"({errors.describe(exc)})") from exc
        raise


class Positions:
    """What ``read_positions`` reads: ``open()`` -> positions in all; ``entries(position)`` -> the images there;
    ``size(position)`` -> how many (for error rows when a position cannot be read); ``bytes_read`` so far."""

    bytes_read = 0

    def open(self) -> int:
        raise NotImplementedError

    def entries(self, position: int) -> list[Entry]:
        raise NotImplementedError

    def size(self, position: int) -> int:
        return 1


def read_positions(segment: Segment, options: ReadOptions, before_chunk, source: Positions) -> Iterator[list[dict]]:
    uri, shard, start = segment.uri, shard_name(segment.uri), segment.start or Position()
    resumed = bool(start.chunk or segment.only or segment.stop_offset is not None)
    chunk, pos, index = start.chunk, start.offset, start.index
    if before_chunk:  # the first chunk's place is taken before its file is opened: any row yielded is that chunk's
        before_chunk(unit_name(shard, chunk))
    try:
        total = retried(source.open, uri, options)
    except GiveUp as exc:
        yield [_given_up(shard, chunk, str(exc))]
        return
    except Exception as exc:
        if resumed:  # readable before: a fault, not data
            yield [_given_up(shard, chunk, f"read: {uri} became unreadable ({errors.describe(exc)})")]
            return
        row = schema.mark_error(schema.new_row(shard, index, "", unit=unit_name(shard, chunk)), "read",
                                f"{uri} is unreadable ({errors.describe(exc)})")
        row["unit_end"] = _end(index, index + 1, 1, pos, pos, 0, True)
        yield [row]
        return
    end = total if segment.stop_offset is None else min(total, segment.stop_offset)
    while True:
        unit = unit_name(shard, chunk)
        if before_chunk and chunk != start.chunk:
            before_chunk(unit)
        first, first_pos, read0, rows, excluded = index, pos, source.bytes_read, [], 0
        wanted = set(segment.only[chunk]) if segment.only and chunk in segment.only else None
        try:
            while pos < end and index - first < segment.chunk_images:
                try:
                    entries = retried(lambda: source.entries(pos), uri, options)
                except GiveUp:
                    raise
                except Exception as exc:
                    entries = [("", {}, _raiser(exc))] * source.size(pos)
                for key, fields, load in entries:
                    i, index = index, index + 1
                    if key and options.exclude and options.exclude.matches(key):
                        excluded += 1
                    elif wanted is None or i in wanted:
                        rows.append(_image_row(schema.new_row(shard, i, key, unit=unit, **fields), load, uri, options))
                        if len(rows) > options.batch_images:  # one kept back: the last carries the end
                            yield rows[:-1]
                            del rows[:-1]
                pos += 1
        except GiveUp as exc:
            yield rows + [_given_up(shard, chunk, str(exc))]
            return
        if not rows and index == first:
            rows.append(schema.mark_error(schema.new_row(shard, first, "", unit=unit), "read",
                                          f"{uri} holds no images"))
        elif not rows:  # every image excluded: a row that only carries the end (the writer drops index -1)
            rows.append(schema.new_row(shard, -1, "", unit=unit, status=schema.ERROR,
                                       error="read: every image of the chunk is excluded"))
        size = index - first - excluded if index > first else 1
        last = segment.stop_offset is None and pos >= total
        unit_end = _end(first, max(index, first + 1), size, first_pos, pos, source.bytes_read - read0, last)
        for row in rows:
            row["unit_end"] = unit_end
        yield rows
        chunk += 1
        if pos >= end or chunk == segment.stop:
            return


def _end(index: int, next_index: int, size: int, offset: int, next_offset: int, read: int, last: bool) -> dict:
    return {"size": size, "bytes_read": read, "offset": offset, "members": offset, "index": index,
            "next_offset": next_offset, "next_members": next_offset, "next_index": next_index, "last": last}


def _raiser(exc: BaseException):
    def load():
        raise exc
    return load


def _image_row(row: dict, load, uri: str, options: ReadOptions) -> dict:
    try:
        data = retried(load, uri, options)
    except GiveUp:
        raise
    except Exception as exc:
        return schema.mark_error(row, "read", errors.describe(exc))
    if data is None:
        return schema.mark_error(row, "read", f"{row['image_key'] or row['index']}: no image (null)")
    try:
        row["width"], row["height"] = images.upright_size(data, options.max_image_pixels)
    except images.ImageError as exc:
        return schema.mark_error(row, "read", str(exc))
    row["image_bytes"] = data
    return row


def _given_up(shard: str, chunk: int, failure: str) -> dict:
    return schema.new_row(shard, -1, "", unit=unit_name(shard, chunk), status=schema.ERROR, error=failure,
                          transient_error=failure)


# ---- a folder of images -----------------------------------------------------------------------------------------

class Folder(Positions):
    """A folder's files (``segment.files``: its recorded listing from the segment's start), one image each."""

    def __init__(self, segment: Segment, options: ReadOptions):
        self.root, self.files, self.s3 = segment.uri.rstrip("/"), segment.files or [], options.s3
        self.first = (segment.start or Position()).offset

    def open(self) -> int:
        return self.first + len(self.files)

    def entries(self, position: int) -> list[Entry]:
        name = self.files[position - self.first]
        return [(posixpath.splitext(name)[0], {"file_name": name}, lambda: self._read(name))]

    def _read(self, name: str) -> bytes:
        fs, path = storage.filesystem(storage.join(self.root, name), self.s3)
        with fs.open_input_stream(path) as f:
            data = f.read()
        self.bytes_read += len(data)
        return data


def read_segment(segment: Segment, options: ReadOptions, before_chunk=None) -> Iterator[list[dict]]:
    yield from read_positions(segment, options, before_chunk, Folder(segment, options))


def split(segment: Segment) -> list[Segment]:
    """One segment per chunk: a folder's chunks are ``chunk_images`` files each, known from the listing."""
    start, files, n = segment.start or Position(), segment.files or [], segment.chunk_images
    if segment.only or len(files) <= n:
        return [segment]
    pieces = []
    for k, at in enumerate(range(0, len(files), n)):
        chunk, offset = start.chunk + k, start.offset + at
        if segment.stop is not None and chunk >= segment.stop:
            break
        final = at + n >= len(files)
        pieces.append(Segment(segment.uri, n, Position(chunk, offset, offset, start.index + at),
                              segment.stop if final else chunk + 1, segment.stop_offset if final else offset + n,
                              files=files[at:at + n]))
    return pieces
