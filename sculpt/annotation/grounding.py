"""Pre- and post-processing of caption-to-phrase grounding (Florence-2), free of any model framework.

Before the model: a caption longer than the text budget of the grounder's encoder is split between sentences
(and, for a sentence that alone is too long, between words), so that no phrase is cut off by truncation; every
chunk keeps its character offset in the caption.

After the model (whose own post-processing turns ``<loc_…>`` tokens into pixel boxes): each phrase is found again
in its chunk, so objects carry their character span in the full caption; pronouns, "the image" and other phrases
that name no region are dropped, boxes are clipped to the image, and degenerate and duplicate boxes are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

TASK = "<CAPTION_TO_PHRASE_GROUNDING>"

# Phrases that name no region of their own. Florence-2's processor bans a similar list (exact, case-sensitive);
# this one is matched case-insensitively after dropping a leading article.
GENERIC_PHRASES = frozenset(
    """
    it its itself i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
    they them their theirs themselves we us our ours ourselves one oneself this that these those who whom whose
    which what all another any anybody anyone anything each everybody everyone everything few many nobody none
    several some somebody someone something other others lots set group each other one another
    the a an image images picture pictures photo photos photograph scene view frame
    """.split()
) | {"each other", "one another", "other objects", "this image", "this picture", "this photo"}

_ARTICLES = ("the ", "a ", "an ")
# A sentence ends at . ! or ? before whitespace, or at a blank line.
_SENTENCE = re.compile(r"\S.*?(?:[.!?]+(?=\s|$)|(?=\s*\n\s*\n)|$)", re.S)
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Chunk:
    """A piece of the caption handed to the grounder on its own: ``text == caption[start:end]``."""

    start: int
    end: int
    text: str


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text``, without the whitespace between them."""
    return [(m.start(), m.end()) for m in _SENTENCE.finditer(text)]


def split_caption(caption: str, budget: int, count_tokens: Callable[[str], int]) -> list[Chunk]:
    """Cut the caption into chunks with ``count_tokens(chunk.text) <= budget``, packing whole sentences greedily.

    A sentence over the budget on its own is cut between words. A single word over the budget raises ValueError:
    it cannot be grounded without truncation.
    """
    pieces: list[tuple[int, int]] = []
    for start, end in sentence_spans(caption):
        if count_tokens(caption[start:end]) <= budget:
            pieces.append((start, end))
        else:
            pieces.extend(_split_words(caption, start, end, budget, count_tokens))
    chunks: list[Chunk] = []
    for start, end in pieces:
        if chunks and count_tokens(caption[chunks[-1].start:end]) <= budget:
            start = chunks.pop().start
        chunks.append(Chunk(start, end, caption[start:end]))
    return chunks


def pack(items: list, sizes: list[int], limit: int) -> list[list]:
    """Consecutive groups of ``items`` whose ``sizes`` sum to at most ``limit``; an item over the limit alone."""
    groups, total = [], 0
    for item, size in zip(items, sizes):
        if not groups or total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += size
    return groups


def _split_words(caption, start, end, budget, count_tokens) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for word in _WORD.finditer(caption, start, end):
        if count_tokens(word.group()) > budget:
            raise ValueError(f"caption word {word.group()[:40]!r}... alone exceeds the grounder's {budget}-token budget")
        if spans and count_tokens(caption[spans[-1][0]:word.end()]) <= budget:
            spans[-1] = (spans[-1][0], word.end())
        else:
            spans.append((word.start(), word.end()))
    return spans


def is_generic(phrase: str) -> bool:
    """True for a phrase that names no region: empty, punctuation only, a pronoun, "the image"..."""
    words = " ".join(re.sub(r"[^\w\s'-]", " ", phrase.lower()).split())
    for article in _ARTICLES:
        if words.startswith(article):
            words = words[len(article):]
            break
    return not re.search(r"[a-z0-9]", words) or words in GENERIC_PHRASES


def _folded(text: str, start: int = 0, end: int | None = None) -> tuple[str, list[int]]:
    """text[start:end] lower-cased, non-ASCII dropped and whitespace runs made one space; plus each kept char's index."""
    chars, index = [], []
    end = len(text) if end is None else end
    for i in range(start, end):
        c = text[i]
        if not c.isascii():
            continue  # Florence-2's post-processing drops non-ASCII characters from phrases
        if c.isspace():
            if not chars or chars[-1] == " ":
                continue
            c = " "
        chars.append(c.lower())
        index.append(i)
    return "".join(chars), index


def find_span(caption: str, phrase: str, start: int = 0, end: int | None = None, after: int | None = None):
    """The character span of ``phrase`` in ``caption[start:end]`` (case, spacing and non-ASCII letters aside).

    The first occurrence at or after ``after`` is preferred, else the first in the range; None when absent.
    """
    needle = _folded(phrase)[0].strip()
    if not needle:
        return None
    haystack, index = _folded(caption, start, end)
    hits = [m.start() for m in re.finditer(re.escape(needle), haystack)]
    if not hits:
        return None
    later = [h for h in hits if after is not None and index[h] >= after]
    h = (later or hits)[0]
    return index[h], index[h + len(needle) - 1] + 1


def clip_box(box, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height)]


def is_degenerate(box, min_size: float = 1.0) -> bool:
    """A box narrower or lower than ``min_size`` pixels (including inverted boxes)."""
    return box[2] - box[0] < min_size or box[3] - box[1] < min_size


def box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def chunk_objects(caption: str, chunk: Chunk, labels: list[str], boxes: list, width: int, height: int,
                  min_box_size: float = 1.0) -> list[dict]:
    """Objects for one chunk from the processor's parsed ``labels``/``boxes`` (pixels of the full image).

    Each object's ``phrase`` is the caption's own text at its span. Phrases that are generic or cannot be found
    in the chunk (not caption text, e.g. a parse of a malformed generation) are dropped, as are degenerate boxes.
    """
    objects, cursor = [], chunk.start
    for label, box in zip(labels, boxes):
        if is_generic(label):
            continue
        span = find_span(caption, label, chunk.start, chunk.end, after=cursor)
        if span is None:
            continue
        box = clip_box(box, width, height)
        if is_degenerate(box, min_box_size):
            continue
        # Florence-2 names phrases in caption order; a phrase with several boxes repeats its label.
        cursor = span[0]
        objects.append({"phrase": caption[span[0]:span[1]], "phrase_start": span[0], "phrase_end": span[1], "box": box})
    return objects


def drop_duplicates(objects: list[dict], iou: float = 0.9) -> list[dict]:
    """Keep the first of objects whose boxes overlap with IoU >= ``iou`` (the same region grounded twice)."""
    kept: list[dict] = []
    for obj in objects:
        if all(box_iou(obj["box"], other["box"]) < iou for other in kept):
            kept.append(obj)
    return kept
