"""What the VLM is asked, and how its answers are cleaned. One place, versioned.

``PROMPTS_VERSION`` goes into the job fingerprint and every output marker: change a prompt, bump it.
Both prompts put the image first and the varying text after it, so every request about one image shares the
image prefix and vLLM's prefix cache computes the image tokens once. The refer prompt adds the caption next,
which is shared by all objects of the image too, and only then the object.
"""

from __future__ import annotations

import re

PROMPTS_VERSION = "gssculpt-3"  # 3: the refer prompt names the other instances of its kind

CAPTION_PROMPT = (
    "Describe this image in detail in one paragraph. Name every salient object and region: things (people, "
    "animals, vehicles, furniture, tools...), stuff (sky, road, grass, water, walls, floor...) and notable parts "
    "of objects. For each, say what it looks like (colour, material, shape, state) and where it is relative to "
    "the others. Write plain sentences, without lists or markdown."
)

REFER_PROMPT = (
    "Image description: {caption}\n\n"
    "Write one referring expression of about 16 words for <ref>{phrase}</ref><box>{box}</box>. Use its "
    "distinctive attributes and its position relative to other objects, so that it cannot be mistaken for "
    "anything else in the image. Do not mention the box or coordinates. Answer with the expression only."
)

# A group (one phrase grounded to several boxes) is referred to as a whole: all its boxes, one expression.
GROUP_REFER_PROMPT = (
    "Image description: {caption}\n\n"
    "Write one referring expression of about 16 words for all of <ref>{phrase}</ref><box>{box}</box> together. "
    "Use what they share and where they are, so that it names exactly these and nothing else in the image. Do "
    "not mention the boxes or coordinates. Answer with the expression only."
)

# Put into a refer prompt right after the caption (the prefix all objects of the image share) when the image holds
# other instances of the target's kind (the instances stage finds them, named or not): where they are, so that the
# expression says what tells the target apart.
OTHERS_SENTENCE = "The image also shows other {kind} instances at <box>{boxes}</box>; the expression must fit none of them.\n\n"

# Negatives (GroundingME, SAM 3): expressions that describe something plausible that the image does not show.
NEGATIVE_PROMPT = (
    "Image description: {caption}\n\n"
    "The image shows: {present}.\n\n"
    "Write {count} referring expression(s) of about 12 words, one per line, each for something that is NOT in "
    "this image but plausibly could be: an absent kind of object, or a present kind with a colour, place or "
    "state it does not have here. Answer with the expressions only."
)

# The listener (actors/listen.py): the expression alone, no caption and no target box, asked in InternVL's own
# referring-expression grounding form; it answers with a box in its 0..1000 convention (``text_to_boxes``).
LISTENER_PROMPT = ("Please provide the bounding box coordinate of the region this sentence describes: "
                   "<ref>{expression}</ref>")

MIN_EXPRESSION_WORDS = 2


def box_to_text(box, width: int, height: int) -> str:
    """A pixel box (x0, y0, x1, y1) in InternVL's convention: ``[[x0, y0, x1, y1]]``, each axis scaled to 0..1000."""
    x0, y0, x1, y1 = box
    scaled = [round(v / size * 1000) for v, size in ((x0, width), (y0, height), (x1, width), (y1, height))]
    return "[[" + ", ".join(str(min(1000, max(0, v))) for v in scaled) + "]]"


def boxes_to_text(boxes, width: int, height: int) -> str:
    """Several pixel boxes in InternVL's convention: ``[[x0, y0, x1, y1], [...]]``."""
    return "[" + ", ".join(box_to_text(box, width, height)[1:-1] for box in boxes) + "]"


_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")


def text_to_boxes(text: str, width: int, height: int) -> list[list[float]]:
    """The pixel boxes (x0, y0, x1, y1) of an answer in InternVL's convention, the inverse of ``box_to_text``: every
    ``[x0, y0, x1, y1]`` in it (``<box>[[...]]</box>``, ``[[...], [...]]`` or bare), each coordinate clamped to
    0..1000 and scaled by its axis; corners given the wrong way round are put right, a box of no area is dropped.
    An answer without one gives ``[]``."""
    boxes = []
    for match in _BOX.finditer(text or ""):
        x0, y0, x1, y1 = (min(1000.0, max(0.0, float(v))) for v in match.groups())
        x0, x1, y0, y1 = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
        if x1 > x0 and y1 > y0:
            boxes.append([x0 / 1000 * width, y0 / 1000 * height, x1 / 1000 * width, y1 / 1000 * height])
    return boxes


def listener_prompt(expression: str) -> str:
    """What the listener asks: where the expression's region is, from the image and the expression alone."""
    return LISTENER_PROMPT.format(expression=expression)


def refer_prompt(caption: str | None, phrase: str | None, box, width: int, height: int, member_boxes=None,
                 other_boxes=None, kind: str | None = None) -> str:
    """The refer prompt of one object, or of a group when ``member_boxes`` lists its members' boxes; with
    ``other_boxes``, the other instances of its ``kind`` (``sculpt.annotation.instances.others``), named between the
    caption and the object."""
    if member_boxes:
        text = GROUP_REFER_PROMPT.format(caption=caption or "(none)", phrase=phrase or "the objects",
                                         box=boxes_to_text(member_boxes, width, height))
    else:
        text = REFER_PROMPT.format(caption=caption or "(none)", phrase=phrase or "the object",
                                   box=box_to_text(box, width, height))
    if not other_boxes:
        return text
    shared = len(f"Image description: {caption or '(none)'}\n\n")  # after the image, every object's prefix
    return text[:shared] + OTHERS_SENTENCE.format(kind=kind or "such", boxes=boxes_to_text(other_boxes, width, height)) \
        + text[shared:]


def negative_prompt(caption: str | None, present: list[str], count: int) -> str:
    names = ", ".join(dict.fromkeys(p.strip() for p in present if p and p.strip())) or "(nothing named)"
    return NEGATIVE_PROMPT.format(caption=caption or "(none)", present=names, count=count)


def clean_negatives(text: str, count: int, present: list[str]) -> list[str]:
    """Up to ``count`` usable expressions, one per line of the answer; a line naming the head noun of something
    present is dropped (it may well be there), as are unusable and repeated lines."""
    from sculpt.annotation.categories import head_noun

    present_heads = {head_noun(p)[0] for p in present if p}
    out: list[str] = []
    for line in text.splitlines():
        try:
            expression = clean_expression(line)
        except ValueError:
            continue
        if head_noun(expression)[0] not in present_heads and expression.lower() not in {e.lower() for e in out}:
            out.append(expression)
    return out[:count]


_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?(?:ref|box|img|quad)>|<IMG_CONTEXT>")
_MARKDOWN = re.compile(r"(\*\*|__|`|^#+\s*|^\s*(?:[-*•]|\d+[.)])\s+)", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _plain(text: str) -> str:
    printable = "".join(c for c in text if (c.isprintable() or c.isspace()) and c != "\ufffd")
    return " ".join(_MARKDOWN.sub("", _SPECIAL.sub(" ", printable)).split())


def clean_caption(text: str, truncated: bool = False) -> str:
    """One paragraph of plain text; a caption cut off by the token limit loses its unfinished last sentence."""
    caption = _plain(text)
    if truncated:
        ends = [m.end() for m in _SENTENCE_END.finditer(caption)]
        caption = caption[: ends[-1]] if ends else caption
    return caption


_LEADIN = re.compile(r"^(?:(?:the\s+)?(?:referring\s+)?expression(?:\s+is)?|answer|output)\s*[:\-]\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"


def clean_expression(text: str) -> str:
    """One sentence, no quotes, no lead-in, no trailing period. Raises ValueError for unusable output."""
    expression = _plain(text.strip().split("\n", 1)[0] if text.strip() else "")
    expression = _LEADIN.sub("", expression).strip(_QUOTES + " ")
    match = _SENTENCE_END.search(expression)
    if match:
        expression = expression[: match.start()]
    expression = expression.strip(_QUOTES + " ,;:")
    words = expression.split()
    if len(words) < MIN_EXPRESSION_WORDS or not any(c.isalpha() for c in expression):
        raise ValueError(f"unusable referring expression {text[:80]!r}")
    return expression
