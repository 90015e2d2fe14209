"""What the VLM is asked, and how its answers are cleaned. One place, versioned.

``PROMPTS_VERSION`` goes into the job fingerprint and every output marker: change a prompt, bump it.
Both prompts put the image first and the varying text after it, so every request about one image shares the
image prefix and vLLM's prefix cache computes the image tokens once. The refer prompt adds the caption next,
which is shared by all objects of the image too, and only then the object.
"""

from __future__ import annotations

import re

from sculpt.annotation import profiles
from sculpt.annotation.profiles import Profile

PROMPTS_VERSION = "gssculpt-4"  # 3: the refer prompt names the other instances of its kind; 4: reasoning prompt

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

# Reasoning references (issue 30; Ground-V's "the fruit rich in antioxidants"): an object the refer stage has a usable
# plain expression for, named by what it is for, how it is used or what one knows about it, not by how it looks.
# Same prefix as the refer prompts (image, then the caption): the prefix cache serves it.
REASONING_PROMPT = (
    "Image description: {caption}\n\n"
    "Reasoning task: without naming it, write one expression of about 12 words that identifies "
    "<ref>{phrase}</ref><box>{box}</box> only by what it is for, how it is used or what one knows about it, like "
    "\"the fruit rich in antioxidants\". Do not mention its colour, material, shape, size, the box or coordinates. "
    "Answer with the expression only."
)

# Grounded chat (issue 30; LLaVA-Grounding's grounded visual chat): questions and answers about the image, written
# from the caption and its kept objects (a numbered list, ``CHAT_OBJECT`` each), every listed object an answer
# mentions marked ``<ref>words</ref>[n]``; sculpt.annotation.chat reads the marks back. Image, then the caption first.
CHAT_PROMPT = (
    "Image description: {caption}\n\n"
    "Chat task. The objects of the image:\n{objects}\n"
    "Write {count} question and answer pair(s) that a person could ask about this image and answer from it. In "
    "each answer, mark every listed object it mentions as <ref>its words</ref>[n], n being its number in the list. "
    "Write each pair as two lines, \"Q: question\" and \"A: answer\"."
)
CHAT_OBJECT = "{n}. " + "<ref>{phrase}</ref><box>{box}</box>"

# The listener (actors/listen.py): the expression alone, no caption and no target box, asked in InternVL's own
# referring-expression grounding form; it answers with a box in its 0..1000 convention (``text_to_boxes``).
LISTENER_PROMPT = ("Please provide the bounding box coordinate of the region this sentence describes: "
                   "<ref>{expression}</ref>")

MIN_EXPRESSION_WORDS = 2


# The prompts above are written in InternVL's words; another VLM family's profile (sculpt.annotation.profiles) puts its
# own referring form where they name a region (REGION) or places (PLACES), and its own listener question.
REGION, PLACES = "<ref>{phrase}</ref><box>{box}</box>", "<box>{boxes}</box>"


def box_to_text(box, width: int, height: int, profile: Profile = profiles.INTERNVL, input_size=None) -> str:
    """A pixel box (x0, y0, x1, y1) in the profile's convention; InternVL's: ``[[x0, y0, x1, y1]]``, each axis
    scaled to 0..1000."""
    return profile.box_to_text(box, width, height, input_size)


def boxes_to_text(boxes, width: int, height: int, profile: Profile = profiles.INTERNVL, input_size=None) -> str:
    """Several pixel boxes in the profile's convention; InternVL's: ``[[x0, y0, x1, y1], [...]]``."""
    return profile.boxes_to_text(boxes, width, height, input_size)


def text_to_boxes(text: str, width: int, height: int, profile: Profile = profiles.INTERNVL,
                  input_size=None) -> list[list[float]]:
    """The pixel boxes (x0, y0, x1, y1) of an answer in the profile's convention, the inverse of ``box_to_text``; in
    InternVL's, every ``[x0, y0, x1, y1]`` in it (``<box>[[...]]</box>``, ``[[...], [...]]`` or bare), each
    coordinate clamped to 0..1000 and scaled by its axis; corners given the wrong way round are put right, a box of
    no area is dropped. An answer without one gives ``[]``."""
    return profile.text_to_boxes(text, width, height, input_size)


def listener_prompt(expression: str, profile: Profile = profiles.INTERNVL) -> str:
    """What the listener asks: where the expression's region is, from the image and the expression alone, in the
    profile's own grounding words (InternVL's: ``LISTENER_PROMPT``)."""
    return profile.listener_prompt(expression)


def with_region(template: str, profile: Profile, phrase: str, boxes, width: int, height: int, input_size=None,
                **fields) -> str:
    """``template`` (InternVL's words, naming its region as ``REGION``) with the region of ``phrase`` at ``boxes``
    in the profile's referring form."""
    if profile.style == "internvl":
        return template.format(phrase=phrase, box=profile.boxes_to_text(boxes, width, height), **fields)
    region = profile.region(phrase, boxes, width, height, input_size).replace("{", "{{").replace("}", "}}")
    return template.replace(REGION, region).format(**fields)


def refer_prompt(caption: str | None, phrase: str | None, box, width: int, height: int, member_boxes=None,
                 other_boxes=None, kind: str | None = None, profile: Profile = profiles.INTERNVL,
                 input_size=None) -> str:
    """The refer prompt of one object, or of a group when ``member_boxes`` lists its members' boxes; with
    ``other_boxes``, the other instances of its ``kind`` (``sculpt.annotation.instances.others``), named between the
    caption and the object. Boxes in the ``profile``'s convention (``input_size``: its resized input, where it
    needs one)."""
    if member_boxes:
        text = with_region(GROUP_REFER_PROMPT, profile, phrase or "the objects", list(member_boxes), width, height,
                           input_size, caption=caption or "(none)")
    else:
        text = with_region(REFER_PROMPT, profile, phrase or "the object", [box], width, height, input_size,
                           caption=caption or "(none)")
    if not other_boxes:
        return text
    shared = len(f"Image description: {caption or '(none)'}\n\n")  # after the image, every object's prefix
    places = profile.places(other_boxes, width, height, input_size).replace("{", "{{").replace("}", "}}")
    others = OTHERS_SENTENCE.replace(PLACES, places).format(kind=kind or "such")
    return text[:shared] + others + text[shared:]


def reasoning_prompt(caption: str | None, phrase: str | None, box, width: int, height: int, member_boxes=None,
                     profile: Profile = profiles.INTERNVL, input_size=None) -> str:
    """The reasoning prompt of one object (a group: all its members' boxes), after the same prefix as its refer
    prompt; ``sculpt.annotation.reasoning`` checks the answer."""
    return with_region(REASONING_PROMPT, profile, phrase or "the object", list(member_boxes) if member_boxes else [box],
                       width, height, input_size, caption=caption or "(none)")


def chat_prompt(caption: str | None, listed: list[tuple[str | None, list]], count: int, width: int, height: int,
                profile: Profile = profiles.INTERNVL, input_size=None) -> str:
    """The grounded chat prompt: ``listed`` holds each listed object's (phrase, boxes), numbered from 1."""
    objects = "\n".join(with_region(CHAT_OBJECT, profile, phrase or "the object", boxes, width, height, input_size, n=n)
                        for n, (phrase, boxes) in enumerate(listed, 1))
    return CHAT_PROMPT.format(caption=caption or "(none)", objects=objects, count=count)


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
