"""Grounded chat (issue 30; LLaVA-Grounding's grounded visual chat, GLaMM's grounded conversations): question-and-answer
turns about an image whose answers mark the objects they name.

Pure logic, no model. The chat stage (``actors/chat.py``, after verify) lists an image's kept objects (``listed``),
asks the VLM for turns (``prompts.chat_prompt``: the caption and the list, numbered from 1) and reads its answer
back here (``parse_turns``): each ``<ref>words</ref>[n]`` of an answer becomes a span of the stored answer text that
names listed object n (``[1, 3]``: several), a mark naming no listed object is plain text, and a turn left without a
span is dropped. A turn is ``{question, answer, spans: [{start, end, objects}]}``, ``answer[start:end]`` the words,
``objects`` indices in the row's ``objects`` (the row's ``chat`` column, ``sculpt.schema.TURN_TYPE``).
"""

from __future__ import annotations

import re

from sculpt.annotation.categories import NEGATIVE

DEFAULT_TURNS = 2  # turns per image (the chat stage's ``turns`` param; 0: none)
MAX_LISTED = 24  # objects listed in one prompt, at most (the largest)

_MARK = re.compile(r"<ref>\s*(.*?)\s*</ref>\s*\[\s*(\d+(?:\s*,\s*\d+)*)\s*\]", re.DOTALL)
# what an answer or question loses: boxes, special tokens, tags, markdown emphasis
_OTHER_TAGS = re.compile(r"<box>.*?</box>|<\|[^|>]*\|>|</?(?:ref|box|p|img|quad)>|<IMG_CONTEXT>|\*\*|__", re.DOTALL)
_LINE = re.compile(r"^\s*(?:\*\*)?([QA])(?:\*\*)?\s*[:.)]\s*(?:\*\*)?\s*(.*)$", re.IGNORECASE)


def listed(objects: list[dict]) -> list[int]:
    """Indices of the objects a chat prompt lists: kept, with a mask and a box, no error, not negatives and not
    reasoning pairs (their targets are listed); the largest ``MAX_LISTED``, in their order."""
    found = [i for i, obj in enumerate(objects or []) if obj.get("kept") is True and obj.get("mask")
             and obj.get("box") is not None and not obj.get("error") and obj.get("category") != NEGATIVE
             and obj.get("target") is None]
    found.sort(key=lambda i: (-(objects[i].get("area") or 0), i))
    return sorted(found[:MAX_LISTED])


def _plain(text: str) -> str:
    return " ".join(_OTHER_TAGS.sub(" ", text).split())


def _pairs(text: str) -> list[tuple[str, str]]:
    """(question, answer) of each ``Q:`` line and the ``A:`` lines after it (an answer may run on several lines)."""
    pairs, question, answer = [], None, None
    for line in (text or "").splitlines():
        match = _LINE.match(line)
        if match and match.group(1).upper() == "Q":
            if question is not None and answer:
                pairs.append((question, answer))
            question, answer = match.group(2), None
        elif match and question is not None and answer is None:
            answer = match.group(2)
        elif answer is not None and line.strip():
            answer += " " + line.strip()
    if question is not None and answer:
        pairs.append((question, answer))
    return pairs


def marked(text: str, listed_objects: list[int]) -> tuple[str, list[dict]]:
    """The answer as stored (marks taken out, other tags dropped, blanks collapsed) and its spans: each mark whose
    numbers name listed objects (1-based) becomes ``{start, end, objects}``; its other numbers are dropped."""
    pieces, at = [], 0  # (text, objects of its span or None)
    for match in _MARK.finditer(text or ""):
        numbers = [int(n) for n in re.findall(r"\d+", match.group(2))]
        objects = list(dict.fromkeys(listed_objects[n - 1] for n in numbers if 1 <= n <= len(listed_objects)))
        pieces += [(_OTHER_TAGS.sub(" ", text[at:match.start()]), None), (_plain(match.group(1)), objects or None)]
        at = match.end()
    pieces.append((_OTHER_TAGS.sub(" ", (text or "")[at:]), None))
    out, spans = "", []
    for piece, objects in pieces:
        piece = re.sub(r"\s+", " ", piece)
        if out.endswith(" ") or not out:
            piece = piece.lstrip(" ")
        if objects and piece:
            spans.append({"start": len(out), "end": len(out) + len(piece), "objects": objects})
        out += piece
    return out.rstrip(" "), spans


def parse_turns(text: str, listed_objects: list[int], count: int) -> list[dict]:
    """Up to ``count`` turns of the VLM's answer whose answers mark at least one listed object (``marked``); the
    question keeps a mark's words, not the mark."""
    turns = []
    for question, answer in _pairs(text):
        question = _plain(_MARK.sub(lambda m: m.group(1), question))
        answer, spans = marked(answer, listed_objects)
        if question and answer and spans:
            turns.append({"question": question, "answer": answer, "spans": spans})
    return turns[:max(0, count)]
