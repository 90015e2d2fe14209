"""Golden tests of categories on objects, multi-object groups (unions, member lists) and the grounded caption."""

import numpy as np

from sculpt.annotation import groups, rle
from sculpt import schema

CAPTION = "Two green plants stand by the window. A gray cat sits on the sofa with the cat's tail under the blue sky."


def obj(phrase, box, mask=None, **extra):
    start = CAPTION.index(phrase)
    return {"phrase": phrase, "phrase_start": start, "phrase_end": start + len(phrase), "box": box, "mask": mask,
            "mask_score": extra.pop("mask_score", 0.9), **extra}


def square(x0, y0, x1, y1, shape=(10, 20)):
    out = np.zeros(shape, bool)
    out[y0:y1, x0:x1] = True
    return rle.encode(out)


def scene():
    return [obj("Two green plants", [0, 0, 4, 5], square(0, 0, 4, 5), mask_score=0.8),
            obj("Two green plants", [10, 0, 14, 6], square(10, 0, 14, 6), mask_score=0.7),
            obj("the window", [5, 0, 20, 4], square(5, 0, 20, 4)),
            obj("A gray cat", [2, 5, 8, 10], square(2, 5, 8, 10)),
            obj("the cat's tail", [0, 7, 12, 10], square(0, 7, 12, 10)),
            obj("the blue sky", [0, 0, 20, 2], square(0, 0, 20, 2))]


def test_categories_of_objects_count_a_plural_phrases_instances_as_single():
    objects = scene()
    groups.categorise(objects)
    assert [o["category"] for o in objects] == ["single", "single", "single", "single", "part", "stuff"]
    alone = [obj("Two green plants", [0, 0, 20, 6])]  # a plural phrase grounded to one box covers them all
    groups.categorise(alone)
    assert alone[0]["category"] == "multi"


def test_a_phrase_grounded_to_several_masked_boxes_makes_one_group():
    objects = scene()
    made = groups.build_groups(objects)
    assert len(made) == 1
    group = made[0]
    assert group["members"] == [0, 1] and group["category"] == "multi" and group["phrase"] == "Two green plants"
    assert group["box"] == [0, 0, 14, 6]
    union = rle.decode(objects[0]["mask"]) | rle.decode(objects[1]["mask"])
    assert np.array_equal(rle.decode(group["mask"]), union) and group["area"] == int(union.sum()) == 44
    assert group["mask_score"] == 0.7  # the weakest member's
    schema.to_table([schema.new_row("u", 0, "k", objects=[schema.new_object(**o) for o in objects + made])])

    assert groups.build_groups(objects + made) == []  # a phrase already grouped gets no second group
    objects[1]["error"] = "mask: box outside"  # a failed member takes no part: one member left, no group
    assert groups.build_groups(objects) == []


def test_the_grounded_caption_links_each_span_to_its_objects():
    objects = scene()
    objects += groups.build_groups(objects)
    objects.append(schema.new_object(expression="a yellow umbrella", category="negative"))  # no span: not linked
    spans = groups.grounded_caption(objects)
    assert [CAPTION[s["start"]:s["end"]] for s in spans] == ["Two green plants", "the window", "A gray cat",
                                                              "the cat's tail", "the blue sky"]
    assert [s["objects"] for s in spans] == [[0, 1, 6], [2], [3], [4], [5]]
