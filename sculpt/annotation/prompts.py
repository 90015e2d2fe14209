"""What the VLM is asked, and how its answers are cleaned. One place, versioned.

``PROMPTS_VERSION`` goes into the job fingerprint and every output marker: change a prompt, bump it.
Both prompts put the image first and the varying text after it, so every request about one image shares the
image prefix and vLLM's prefix cache computes the image tokens once. The refer prompt adds the caption next,
which is shared by all objects of the image too, and only then the object.
"""

from __future__ import annotations

import re

PROMPTS_VERSION = "gssculpt-2"

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

# Negatives (GroundingME, SAM 3): expressions that describe something plausible that the image does not show.
NEGATIVE_PROMPT = (
    "Image description: {caption}\n\n"
    "The image shows: {present}.\n\n"
    "Write {count} referring expression(s) of about 12 words, one per line, each for something that is NOT in "
    "this image but plausibly could be: an absent kind of object, or a present kind with a colour, place or "
    "state it does not have here. Answer with the expressions only."
)

MIN_EXPRESSION_WORDS = 2


def box_to_text(box, width: int, height: int) -> str:
    """A pixel box (x0, y0, x1, y1) in InternVL's convention: ``[[x0, y0, x1, y1]]``, each axis scaled to 0..1000."""
    x0, y0, x1, y1 = box
    scaled = [round(v / size * 1000) for v, size in ((x0, width), (y0, height), (x1, width), (y1, height))]
    return "[[" + ", ".join(str(min(1000, max(0, v))) for v in scaled) + "]]"


def boxes_to_text(boxes, width: int, height: int) -> str:
    """Several pixel boxes in InternVL's convention: ``[[x0, y0, x1, y1], [...]]``."""
    return "[" + ", ".join(box_to_text(box, width, height)[1:-1] for box in boxes) + "]"


def refer_prompt(caption: str | None, phrase: str | None, box, width: int, height: int, member_boxes=None) -> str:
    """The refer prompt of one object, or of a group when ``member_boxes`` lists its members' boxes."""
    if member_boxes:
        return GROUP_REFER_PROMPT.format(caption=caption or "(none)", phrase=phrase or "the objects",
                                         box=boxes_to_text(member_boxes, width, height))
    return REFER_PROMPT.format(caption=caption or "(none)", phrase=phrase or "the object", box=box_to_text(box, width, height))


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
