"""The kinds of input a job reads, behind one reader: what ``input.shards`` names, and one stream of rows per segment.

- ``sa1b``: SA-1B tars, an image and its ``.json`` per member pair (``sculpt.io.shards``).
- ``webdataset``: tars of samples, any key layout: a sample's members share a key (``dir/0001.jpg``,
  ``dir/0001.json``, ``dir/0001.cls``…), its image is the member whose extension is in ``image_extensions``, a
  ``.json`` is optional (``sculpt.io.webdataset``). A unit is a chunk of a tar, as for SA-1B.
- ``images``: a folder or s3:// prefix of image files, listed once (sorted, recursively) and recorded in the output
  (``OUT/.sculpt/listings/<folder>.json``): a unit is a chunk of that listing, and a resume reads the recorded one,
  so that files added since shift no chunk (they are not read) (``sculpt.io.folders``).
- ``parquet``: Parquet files (a Hugging Face dataset saved as Parquet too) with an image column (bytes, a path, or
  Hugging Face's ``{bytes, path}``) and optionally an id column; a unit is a chunk of row groups, and a resume reads
  no committed row group (``sculpt.io.tables``).

Every kind yields ``schema.new_row`` rows and a chunk's ``unit_end`` as the SA-1B reader does: ``offset`` and
``next_offset`` are where a chunk begins and ends in the kind's own terms (a tar's bytes, a listing's files, a file's
row groups), so that markers, commits, resume and redo are one code path. ``image_key``: the tar member's stem
(SA-1B), the sample's key (WebDataset), the file's path in its folder without extension (images), the id column's
value or else the row's position in its file (Parquet).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from sculpt import errors
from sculpt.io import shards, storage
from sculpt.io.shards import ReadOptions, Segment
from sculpt.io.storage import SHARD_SUFFIXES, S3Options

KINDS = ("sa1b", "images", "webdataset", "parquet")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LISTINGS = ".sculpt/listings"  # under the output: each folder's recorded listing


@dataclass(frozen=True)
class Source:
    """What kind of input a job reads, and how (from ``input``: kind, image_extensions, image_column, id_column)."""

    kind: str = "sa1b"
    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # images: the files read; webdataset: a sample's image
    image_column: str = "image"  # parquet
    id_column: str | None = None  # parquet; None: the row's position in its file

    def settings(self) -> dict | None:
        """What the job's fingerprint takes of it: None for SA-1B (as before there were kinds)."""
        if self.kind == "sa1b":
            return None
        mine = {"kind": self.kind}
        if self.kind in ("images", "webdataset"):
            mine["image_extensions"] = list(self.image_extensions)
        if self.kind == "parquet":
            mine.update(image_column=self.image_column, id_column=self.id_column)
        return mine

    @classmethod
    def of_job(cls, job: dict | None) -> "Source":
        """The source a job file records (``settings.input.source``; none: SA-1B)."""
        mine = dict(((job or {}).get("settings") or {}).get("input", {}).get("source") or {})
        if "image_extensions" in mine:
            mine["image_extensions"] = tuple(mine["image_extensions"])
        return cls(**mine)

    def suffixes(self) -> tuple[str, ...]:
        return tuple(f".{e.lower()}" for e in self.image_extensions)


def _category(path: str, source: Source) -> str | None:
    lower = path.lower()
    if lower.endswith(SHARD_SUFFIXES):
        return "tar"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(source.suffixes()):
        return "images"
    return None


def _fix(kind: str) -> str:
    return ("check input.shards (or --input): SA-1B or WebDataset tars, a folder of images, Parquet files — files, "
            "folders, globs or s3:// prefixes" + ("" if kind == "auto" else f"; input.kind is {kind}"))


def find(patterns: list[str], kind: str, s3: S3Options = S3Options(), source: Source = Source(),
         recorded: str | None = None) -> tuple[Source, list[str]]:
    """The input's kind (``kind``, or what the files show when it is ``auto``) and its shards: tar or Parquet
    files, or the folders of an images input; sorted. Tars are SA-1B's when the first one's first member is named
    as SA-1B's are, unless the output already ``recorded`` which kind its tars are (a resume asks the output, not
    the input). What cannot be used ends the job with one line naming the fix (``errors.BadInput``; a store that
    cannot be listed: ``errors.StoreFailure``)."""
    found: dict[str, set[str]] = {}  # category -> shard uris
    for pattern in patterns:
        with errors.at_job_level(pattern):
            try:
                suffixes = (*SHARD_SUFFIXES, ".parquet", *source.suffixes())
                files = storage.list_files(pattern, s3, suffixes + tuple(s.upper() for s in suffixes))
            except FileNotFoundError as exc:
                raise errors.BadInput(f"{exc}; {_fix(kind)}") from None
        for category in {_category(f, source) for f in files} - {None}:
            if category == "images":
                if len(files) == 1 and files[0] == pattern or glob.has_magic(pattern):
                    raise errors.BadInput(f"input.shards: {pattern} names image files; give the folder (or s3:// "
                                          "prefix) that holds them")
                found.setdefault(category, set()).add(_folder(pattern))
            else:
                found.setdefault(category, set()).update(f for f in files if _category(f, source) == category)
    wanted = {"sa1b": "tar", "webdataset": "tar", "images": "images", "parquet": "parquet"}.get(kind)
    if wanted:
        found = {wanted: found.get(wanted, set())}
    elif len(found) > 1:
        raise errors.BadInput(f"input.shards holds {' and '.join(sorted(found))} files: one kind of input a job; set "
                              f"input.kind ({', '.join(KINDS)}) or give only one kind")
    category, uris = next(iter(found.items()), ("tar", set()))
    uris = sorted(uris)
    if not uris:
        what = {"tar": f"shards ({', '.join(SHARD_SUFFIXES)})", "parquet": "Parquet files (.parquet)",
                "images": f"images ({', '.join(source.suffixes())})"}[category]
        raise errors.BadInput(f"no {what} found in {patterns}; {_fix(kind)}")
    names: dict[str, str] = {}
    for uri in uris:
        other = names.setdefault(shards.shard_name(uri), uri)
        if other != uri:
            raise errors.BadInput(f"two shards would write the same output unit {shards.shard_name(uri)!r}: {other} "
                                  f"and {uri}; give input.shards only one of them, or rename one")
    if category == "tar":
        resolved = (kind if kind != "auto" else recorded if recorded in ("sa1b", "webdataset")
                    else "sa1b" if _looks_sa1b(uris[0], s3) else "webdataset")
    else:
        resolved = category
    if resolved == "parquet":
        from sculpt.io import tables

        tables.check_columns(uris[0], source, s3)
    return dataclasses.replace(source, kind=resolved), uris


def _folder(pattern: str) -> str:
    return pattern.rstrip("/") if storage.is_s3(pattern) else os.path.abspath(pattern)


def _looks_sa1b(uri: str, s3: S3Options) -> bool:
    """Whether a tar's first image or json member is named as SA-1B's are (``sa_<id>``); an empty or unreadable
    tar counts as SA-1B (its reader makes the error rows it always has)."""
    try:
        fs, path = storage.filesystem(uri, s3)
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for number, member in enumerate(tar):
                parsed = shards._member_key(member.name) if member.isfile() else None
                if parsed is not None:
                    return shards.image_id_of(parsed[0]) is not None
                if number > 100:
                    break
    except (OSError, tarfile.TarError, EOFError):
        pass
    return True


# ---- a folder's recorded listing --------------------------------------------------------------------------------

def listing_uri(out: str, shard: str) -> str:
    return storage.join(out, LISTINGS, f"{shard}.json")


def list_images(root: str, source: Source, s3: S3Options = S3Options()) -> list[str]:
    """The image files under a folder or prefix, as paths relative to it, sorted (byte order of their UTF-8)."""
    files = storage.list_files(root, s3, source.suffixes() + tuple(s.upper() for s in source.suffixes()))
    base = root.rstrip("/") + "/"
    relative = [f[len(base):] if f.startswith(base) else posixpath.relpath(f, root) for f in files]
    return sorted((r for r in relative if not any(p.startswith(".") for p in r.split("/"))),
                  key=lambda r: r.encode())


def read_listing(out: str, shard: str, s3: S3Options = S3Options()) -> list[str] | None:
    data = storage.read_bytes(listing_uri(out, shard), s3)
    return json.loads(data)["files"] if data else None


def write_listing(out: str, shard: str, files: list[str], s3: S3Options = S3Options()) -> None:
    storage.write_atomic(listing_uri(out, shard), json.dumps({"files": files}).encode(), s3)
    if not storage.is_s3(out):  # the atomic write's empty temporary folder
        with contextlib.suppress(OSError):
            os.rmdir(storage.join(out, LISTINGS, storage.TMP_DIR))


def with_files(segment: Segment, files: list[str]) -> Segment:
    """A folder's segment with its part of the listing: from where it starts to where it stops."""
    start = (segment.start or shards.Position()).offset
    return dataclasses.replace(segment, files=files[start:segment.stop_offset])


# ---- reading ----------------------------------------------------------------------------------------------------

def split(segment: Segment, options: ReadOptions) -> list[Segment]:
    """The segment as one segment per chunk where the input allows (``shards.split`` for SA-1B)."""
    kind = options.source.kind if options.source else "sa1b"
    if kind == "images":
        from sculpt.io import folders

        return folders.split(segment)
    if kind == "parquet":
        from sculpt.io import tables

        return tables.split(segment, options)
    if kind == "webdataset":
        return [segment]  # read in order: its chunks' starts are only known as its samples are grouped
    return shards.split(segment)


def read_segment(segment: Segment, options: ReadOptions, before_chunk=None) -> Iterator[list[dict]]:
    """The segment's rows in batches, a chunk's last batch carrying its ``unit_end`` (``shards.read_segment``)."""
    kind = options.source.kind if options.source else "sa1b"
    if kind == "images":
        from sculpt.io import folders

        yield from folders.read_segment(segment, options, before_chunk)
    elif kind == "parquet":
        from sculpt.io import tables

        yield from tables.read_segment(segment, options, before_chunk)
    elif kind == "webdataset":
        from sculpt.io import webdataset

        yield from webdataset.read_segment(segment, options, before_chunk)
    else:
        yield from shards.read_segment(segment, options, before_chunk)


def read_shard(uri: str, options: ReadOptions, files: list[str] | None = None) -> Iterator[list[dict]]:
    """A whole shard as one unit (export, preview, tools); ``files``: a folder's listing (default: listed now)."""
    kind = options.source.kind if options.source else "sa1b"
    if kind == "images" and files is None:
        files = list_images(uri, options.source, options.s3)
    yield from read_segment(Segment(uri, chunk_images=1 << 62, files=files), options)
