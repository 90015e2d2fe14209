"""Every instance of a kind: pure logic over an image's objects and the instances a concept segmenter (SAM 3) found
for each kind, no model.

The **kind** of a phrase is its head noun in the singular ("two green plants" -> "plant"). The instances stage
(``actors/instances.py``) asks the segmenter, once per image, for every instance of each kind its objects name
(things and parts; stuff and negatives have no instances), and hands each kind's instances here:

- an instance that overlaps a named object of its kind (mask IoU or box IoU >= ``match_iou``, one to one, best
  first) is that object;
- every other instance is an object the caption missed: a new object of that kind (``phrase`` the kind, no caption
  span), so the verify stage's rivals (every other masked object, ``verify.related`` aside) include it and the
  refer stage writes an expression for it too;
- each object of the kind (named, found, and the groups of its members) records ``instances``: how many the
  image holds;
- a group (``multi``) whose phrase gives no count ("green plants", not "two green plants") is completed with the
  found ones: they join its members and its mask, box and area grow to match.

``others(objects, i)`` gives the boxes of the other instances of object i's kind, which the refer prompt names.
"""

from __future__ import annotations

from sculpt.annotation import rle
from sculpt.annotation.categories import (NAMES, NEGATIVE, PART, PLURAL_WORDS, QUANTIFIERS, STUFF, category,
                                          head_noun, is_plural, words)

DEFAULT_SCORE = 0.5  # keep an instance whose score (query score x presence score) is above this
MATCH_IOU = 0.5  # an instance is a named object when its mask or its box overlaps the object's this much
NOT_ASKED = (NAMES[STUFF], NEGATIVE)  # categories without instances
COUNT_WORDS = frozenset("two three four five six seven eight nine ten both pair pairs couple".split())
IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "feet": "foot",
             "teeth": "tooth", "mice": "mouse", "geese": "goose"}


def singular(word: str) -> str:
    """>>> [singular(w) for w in ("plants", "boxes", "berries", "people", "glass", "sheep")]
    ['plant', 'box', 'berry', 'person', 'glass', 'sheep']"""
    if word in IRREGULAR or word in PLURAL_WORDS:
        return IRREGULAR.get(word, word)
    if not is_plural(word):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses")):
        return word[:-2]
    return word[:-1]


def kind(phrase: str | None) -> str:
    """The kind of a phrase: its head noun, singular ("" when it has none)."""
    return singular(head_noun(phrase or "")[0])


def asked_kind(phrase: str | None, category_name: str | None = None) -> str | None:
    """The kind to ask the segmenter about for an object of this phrase (and category, when known); None for
    stuff, negatives and phrases without a head noun."""
    name = category_name or NAMES[category(phrase or "")]
    found = kind(phrase)
    return found if found and name not in NOT_ASKED and found not in QUANTIFIERS else None


def counted(phrase: str | None) -> bool:
    """The phrase says how many ("two green plants", "both cups"): its group is not to be completed."""
    return any(w in COUNT_WORDS or w.isdigit() for w in words(phrase or ""))


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _asked(obj: dict) -> str | None:
    if obj.get("mask") is None or obj.get("error") or obj.get("box") is None:
        return None
    return asked_kind(obj.get("phrase"), obj.get("category"))


def kinds(objects: list[dict]) -> dict[str, list[int]]:
    """{kind: indices of the masked objects of that kind that are no group}, in first-seen order: what to ask."""
    out: dict[str, list[int]] = {}
    for i, obj in enumerate(objects):
        found = _asked(obj)
        if found and not obj.get("members"):
            out.setdefault(found, []).append(i)
    return out


def match(objects: list[dict], named: list[int], found: list[dict], match_iou: float = MATCH_IOU) -> dict[int, int]:
    """{index in ``found``: index in ``objects``}: each found instance ({box, mask, score}) paired with at most one
    named object and each object with at most one instance, the best overlap (mask IoU or box IoU) first."""
    scores = []
    for f, instance in enumerate(found):
        for i in named:
            obj = objects[i]
            overlap = box_iou(instance["box"], obj["box"])
            if overlap < match_iou:  # masks of other sizes than the image's never reach here from the stage
                overlap = max(overlap, rle.iou(instance["mask"], obj["mask"]))
            if overlap >= match_iou:
                scores.append((overlap, f, i))
    pairs: dict[int, int] = {}
    for _, f, i in sorted(scores, key=lambda s: (-s[0], s[1], s[2])):
        if f not in pairs and i not in pairs.values():
            pairs[f] = i
    return pairs


def add_instances(objects: list[dict], kind_name: str, found: list[dict], params: dict) -> list[dict]:
    """Merge one kind's found instances into the image's objects, in place (see the module's doc); returns the
    fields of the new objects, which the caller appends as objects (``schema.new_object(**fields)``) — their indices
    follow the current objects', and the completed groups already list them."""
    named = [i for i in kinds(objects).get(kind_name, [])]
    pairs = match(objects, named, found, params.get("match_iou", MATCH_IOU))
    part = any(objects[i].get("category") == NAMES[PART] for i in named)
    new = [{"phrase": kind_name, "box": [float(v) for v in instance["box"]], "mask": instance["mask"],
            "area": rle.area(instance["mask"]), "mask_score": float(instance["score"]),
            "category": NAMES[PART] if part else "single"}
           for f, instance in enumerate(found) if f not in pairs]
    first = len(objects)
    count = len(named) + len(new)
    for obj in [objects[i] for i in named] + new:
        obj["instances"] = count
    for obj in objects:
        if obj.get("members") and _asked(obj) == kind_name:
            obj["instances"] = count
            if new and params.get("complete_groups", True) and not counted(obj.get("phrase")):
                complete(obj, new, first)
    return new


def complete(group: dict, new: list[dict], first: int) -> None:
    """Add the new objects (to be appended at ``first``...) to a group: members, mask, box, area, mask_score."""
    group["members"] = list(group["members"]) + list(range(first, first + len(new)))
    group["mask"] = rle.union([group["mask"], *(n["mask"] for n in new)])
    group["area"] = rle.area(group["mask"])
    boxes = [group["box"], *(n["box"] for n in new)]
    group["box"] = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    if group.get("mask_score") is not None:
        group["mask_score"] = min([group["mask_score"], *(n["mask_score"] for n in new)])


def others(objects: list[dict], i: int) -> list[list[float]]:
    """The boxes of the other instances of object i's kind (no group, none of its own members), which its
    expression must not fit; [] when it has no kind or no other instance."""
    target = objects[i]
    mine = _asked(target)
    if not mine:
        return []
    own = {i, *(target.get("members") or [])}
    return [obj["box"] for j, obj in enumerate(objects)
            if j not in own and not obj.get("members") and _asked(obj) == mine]
