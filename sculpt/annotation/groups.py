"""Multi-object references and the grounded caption: pure logic over an image's objects, no model.

A **group** is one caption phrase that the grounder tied to several boxes ("two green plants"): its members are
those objects, its mask their union, its box their union box, its category ``multi``. It is referred to and
verified as a whole (the refer stage asks for one expression for all member boxes, the verifier judges that
expression against the union). A group is built once its members have masks (the mask stage); members keep
their own pairs.

The **grounded caption** links each grounded span of the caption to the objects (members and groups) it names.
"""

from __future__ import annotations

from sculpt.annotation import rle
from sculpt.annotation.categories import MULTI, NAMES, SINGLE, category

MIN_MEMBERS = 2


def categorise(objects: list[dict]) -> None:
    """Set each object's ``category`` from its phrase and how many boxes that phrase was grounded to.

    One instance of a phrase with several boxes ("two green plants", box 1 of 2) is a single object (or a part
    or stuff, as its phrase says); the group the mask stage builds from them is the multi-object reference.
    """
    by_span = objects_by_span(objects)
    for obj in objects:
        if obj.get("category") or obj.get("phrase") is None:
            continue
        kind = category(obj["phrase"], 1)
        if len(by_span.get((obj["phrase_start"], obj["phrase_end"]), [])) > 1 and kind == MULTI:
            kind = SINGLE  # an instance of a plural phrase
        obj["category"] = NAMES[kind]


def build_groups(objects: list[dict]) -> list[dict]:
    """Group objects for the phrases grounded to several masked boxes (objects with errors take no part), in
    caption order; each lists its members as indices into ``objects``. Phrases already grouped get none."""
    grouped = {(o["phrase_start"], o["phrase_end"]) for o in objects if o.get("members")}
    spans = objects_by_span(objects, lambda o: not o.get("members") and o.get("mask") and not o.get("error"))
    groups = []
    for span, members in sorted(spans.items()):
        if len(members) < MIN_MEMBERS or span in grouped:
            continue
        parts = [objects[i] for i in members]
        mask = rle.union([p["mask"] for p in parts])
        boxes = [p["box"] for p in parts]
        groups.append({
            "phrase": parts[0]["phrase"], "phrase_start": span[0], "phrase_end": span[1],
            "box": [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)],
            "mask": mask, "area": rle.area(mask), "mask_score": min(p["mask_score"] for p in parts),
            "category": NAMES[MULTI], "members": members,
        })
    return groups


def grounded_caption(objects: list[dict]) -> list[dict]:
    """The caption's grounded spans in order, each with the indices of the objects that name it."""
    return [{"start": start, "end": end, "objects": indices}
            for (start, end), indices in sorted(objects_by_span(objects).items())]


def objects_by_span(objects: list[dict], wanted=lambda obj: True) -> dict[tuple, list[int]]:
    """(phrase_start, phrase_end) -> indices of the ``wanted`` objects grounded to that caption span."""
    spans: dict[tuple, list[int]] = {}
    for i, obj in enumerate(objects):
        if obj.get("phrase_start") is not None and wanted(obj):
            spans.setdefault((obj["phrase_start"], obj["phrase_end"]), []).append(i)
    return spans
