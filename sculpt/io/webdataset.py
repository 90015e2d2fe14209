"""WebDataset tars: samples of members that share a key, in any key layout, read as SA-1B tars are.

A member ``dir/0001.jpg`` belongs to sample ``dir/0001`` (the key: its path up to the first dot of its file name),
its extension ``jpg`` says what it is: the sample's image when it is one of ``Source.image_extensions``, its
optional metadata when ``json``; any other member (``.cls``, ``.txt``…) is passed over. A sample's members come one
after another (WebDataset's rule), so a sample is whole once a member of another key begins, or the tar ends.
Chunks, resume, faults and error rows are the SA-1B reader's (``sculpt.io.shards``): a sample without an image,
or whose image does not decode, is its error row. ``image_key`` is the sample's key.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator

from sculpt import schema
from sculpt.annotation import images
from sculpt.io import shards
from sculpt.io.shards import ReadOptions, Segment


def member_key(name: str, extensions: tuple[str, ...]) -> tuple[str, str, str]:
    """(key, 'image'|'json'|'', extension) of a member name: ``./a/0001.seg.png`` -> ('a/0001', 'image', 'seg.png')
    when ``seg.png`` or ``png`` is an image extension."""
    while name.startswith("./"):
        name = name[2:]
    folder, base = posixpath.split(name)
    stem, dot, extension = base.partition(".")
    key = posixpath.join(folder, stem) if folder else stem
    extension = extension.lower()
    if extension in extensions or extension.rpartition(".")[2] in extensions and dot:
        return key, "image", extension
    return key, ("json" if extension == "json" else ""), extension


class _SampleReader(shards._SegmentReader):
    def __init__(self, segment: Segment, options: ReadOptions, before_chunk):
        super().__init__(segment, options, before_chunk)
        self.extensions = tuple(e.lower().lstrip(".") for e in options.source.image_extensions)
        self.names: dict[str, str] = {}  # sample key -> its image member's extension

    def _parse(self, member: tarfile.TarInfo) -> tuple[str, str] | None:
        if not member.isfile():
            return None
        key, kind, extension = member_key(member.name, self.extensions)
        if not kind or (kind == "image" and "image" in self.pending.get(key, {})):
            return None  # another member of the sample, or a second image of it: passed over
        if kind == "image":
            self.names[key] = extension
        return key, kind

    def _ready_before(self, key: str) -> list[str]:
        return [other for other in self.pending if other != key]  # a new key: the samples before it are whole

    def _complete(self, key: str) -> bool:
        return False  # whole only once the next sample begins, or the tar ends

    def _row(self, key: str, parts: dict) -> dict:
        extension = self.names.pop(key, "jpg")
        row = schema.new_row(self.shard, self.count, key, unit=shards.unit_name(self.shard, self.chunk),
                             file_name=f"{key}.{extension}")
        if "image" not in parts:
            return schema.mark_error(row, "read", f"sample {key} has no image (.{', .'.join(self.extensions)}) "
                                                  "in the tar; set input.image_extensions to its image's")
        if parts["image"] is None or ("json" in parts and parts["json"] is None):
            return schema.mark_error(row, "read", parts.get("broken") or f"sample {key} cut off")
        if parts.get("json") is not None and self.options.keep_source_annotations:
            row["source_annotations"] = parts["json"].decode("utf-8", "replace")
        try:
            row["width"], row["height"] = images.upright_size(parts["image"], self.options.max_image_pixels)
        except images.ImageError as exc:
            return schema.mark_error(row, "read", str(exc))
        row["image_bytes"] = parts["image"]
        return row


def read_segment(segment: Segment, options: ReadOptions, before_chunk=None) -> Iterator[list[dict]]:
    yield from _SampleReader(segment, options, before_chunk).batches()
