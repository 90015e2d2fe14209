"""What the VLM is asked, and how its answers are cleaned. One place, versioned.

``PROMPTS_VERSION`` goes into the job fingerprint and every output marker: change a prompt, bump it.
Both prompts put the image first and the varying text after it, so every request about one image shares the
image prefix and vLLM's prefix cache computes the image tokens once. The refer prompt adds the caption next,
which is shared by all objects of the image too, and only then the object.
"""

from __future__ import annotations

import re

PROMPTS_VERSION = "gssculpt-1"

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

MIN_EXPRESSION_WORDS = 2


def box_to_text(box, width: int, height: int) -> str:
    """A pixel box (x0, y0, x1, y1) in InternVL's convention: ``[[x0, y0, x1, y1]]``, each axis scaled to 0..1000."""
    x0, y0, x1, y1 = box
    scaled = [round(v / size * 1000) for v, size in ((x0, width), (y0, height), (x1, width), (y1, height))]
    return "[[" + ", ".join(str(min(1000, max(0, v))) for v in scaled) + "]]"


def refer_prompt(caption: str | None, phrase: str | None, box, width: int, height: int) -> str:
    return REFER_PROMPT.format(caption=caption or "(none)", phrase=phrase or "the object", box=box_to_text(box, width, height))


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
