"""Exclusion lists (``input.exclude``): images a job skips without reading their bytes, e.g. a benchmark's.

One entry a line: an SA-1B image id (``1234``, the integer in ``sa_1234.jpg`` and the json's ``image.image_id``) or
an image file name (``sa_1234.jpg``, or a path ending in one). Blank lines and ``#`` comments are ignored. An image
is matched by its tar member's name alone (a file name by its stem: the image and its json alike), before either
member is read.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass

from sculpt import errors
from sculpt.io import storage

IMAGE_NAME = re.compile(r"\S+\.(jpg|jpeg|png)", re.IGNORECASE)


@dataclass(frozen=True)
class Exclusions:
    ids: frozenset[int] = frozenset()
    stems: frozenset[str] = frozenset()  # file names without their suffix

    def __bool__(self) -> bool:
        return bool(self.ids or self.stems)

    def matches(self, key: str) -> bool:
        """Whether the image of a member key (``sa_1234``, maybe under directories) is excluded."""
        stem = posixpath.basename(key)
        match = re.fullmatch(r"sa_(\d+)", stem)
        return stem in self.stems or (match is not None and int(match.group(1)) in self.ids)

    def digest(self) -> str:
        """The list's content as the job's fingerprint takes it: order, comments and the path do not count."""
        text = "\n".join([*map(str, sorted(self.ids)), *sorted(self.stems)])
        return hashlib.sha256(text.encode()).hexdigest()


def parse(text: str, where: str = "the exclusion list") -> Exclusions:
    ids, stems = set(), set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry.isascii() and entry.isdigit():
            ids.add(int(entry))
        elif IMAGE_NAME.fullmatch(entry):
            stems.add(posixpath.splitext(posixpath.basename(entry))[0])  # a path in the list: its file name
        else:
            raise errors.BadInput(f"{where} line {number}: {entry!r} is neither an image id (an integer) nor an "
                                  f"image file name (sa_1234.jpg); fix the line or input.exclude")
    return Exclusions(frozenset(ids), frozenset(stems))


def load(uri: str | None, s3: storage.S3Options = storage.S3Options()) -> Exclusions:
    """The list at ``uri`` (local or s3://); None: no list. A list that cannot be read ends the job with one line."""
    if not uri:
        return Exclusions()
    where = f"input.exclude {uri}"
    with errors.at_job_level(uri, doing=f"reading {where}"):
        data = storage.read_bytes(uri, s3)
    if data is None:
        raise errors.BadInput(f"{where} does not exist; give a file of image ids or file names, one a line")
    try:
        return parse(data.decode(), where)
    except UnicodeDecodeError as exc:
        raise errors.BadInput(f"{where} is not text ({exc}); give a file of image ids or file names, "
                              "one a line") from None
