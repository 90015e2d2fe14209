"""Every instance a rival (issue 28): the pure rules of sculpt.annotation.instances on golden objects, the refer
prompt that names the other instances, and the instances stage on the tiny SAM 3 (real format, real loading code)."""

import numpy as np
import pytest

from sculpt import schema
from sculpt.annotation import instances, prompts, rle, verify


def box_mask(box, height=100, width=200):
    mask = np.zeros((height, width), bool)
    mask[int(box[1]):int(box[3]), int(box[0]):int(box[2])] = True
    return rle.encode(mask)


def obj(phrase, box, category="single", **fields):
    return schema.new_object(phrase=phrase, box=[float(v) for v in box], mask=box_mask(box), category=category, **fields)


def found(box, score=0.9):
    return {"box": [float(v) for v in box], "mask": box_mask(box), "score": score}


def test_the_kind_of_a_phrase_is_its_head_noun_in_the_singular():
    assert [instances.kind(p) for p in ("two green plants", "a gray cat on the sofa", "the boxes", "three berries",
                                        "people walking", "a pair of glasses", "")] == \
        ["plant", "cat", "box", "berry", "person", "pair", ""]
    assert instances.asked_kind("the wooden floor") is None  # stuff has no instances
    assert instances.asked_kind("a cat", "negative") is None
    assert instances.asked_kind("its long tail") == "tail"  # a part: the other ear is a rival too
    assert instances.counted("two green plants") and instances.counted("both cups") and not instances.counted("plants")


def test_a_found_instance_is_the_named_object_it_overlaps_and_the_others_become_new_objects_of_its_kind():
    objects = [obj("a dog", (0, 0, 50, 50)), obj("a cat", (60, 0, 110, 50)), obj("the grass", (0, 60, 200, 100), "stuff")]
    assert instances.kinds(objects) == {"dog": [0], "cat": [1]}
    # the named dog's box, slightly off; a second dog nobody named
    new = instances.add_instances(objects, "dog", [found((150, 0, 198, 48), 0.8), found((2, 1, 50, 52))], {})
    assert [n["phrase"] for n in new] == ["dog"] and new[0]["box"] == [150.0, 0.0, 198.0, 48.0]
    assert new[0]["mask_score"] == pytest.approx(0.8) and new[0]["area"] == 48 * 48 and new[0]["category"] == "single"
    assert objects[0]["instances"] == new[0]["instances"] == 2 and objects[1]["instances"] is None
    assert objects[2]["instances"] is None
    objects += [schema.new_object(**n) for n in new]
    # the new dog is a rival of the named dog's pair: the verifier's mask over both is ambiguous
    objects[0]["expression"] = "the dog on the left"
    params = {"threshold": 0.5, "margin": 0.1, "min_words": 3, "max_words": 40, "duplicate_similarity": 1.0,
              "negative_area": 0.01, "listener_threshold": 0.5}
    both = np.zeros((100, 200), bool)
    both[0:50, 0:50] = both[0:48, 150:198] = True
    verify.judge(objects, 0, rle.encode(both), params)
    assert objects[0]["rival_iou"] > 0.4 and objects[0]["reject_reason"] == "rival"


def test_matching_is_one_to_one_and_by_mask_when_the_boxes_disagree():
    objects = [obj("a cup", (0, 0, 40, 40)), obj("a cup", (45, 0, 85, 40))]
    pairs = instances.match(objects, [0, 1], [found((44, 0, 86, 41)), found((0, 0, 41, 40)), found((1, 1, 40, 40))])
    assert pairs == {0: 1, 1: 0}  # the third overlaps cup 0 too, but cup 0 is taken by the better one
    # a box that fits badly, a mask that fits: one object
    loose = obj("a cup", (0, 0, 100, 100))
    loose["mask"] = box_mask((0, 0, 40, 40))
    assert instances.match([loose], [0], [found((0, 0, 40, 40))]) == {0: 0}


def group_scene(phrase):
    objects = [obj(phrase, (0, 0, 40, 40)), obj(phrase, (50, 0, 90, 40))]
    objects.append(schema.new_object(phrase=phrase, box=[0.0, 0.0, 90.0, 40.0], category="multi", members=[0, 1],
                                     mask=rle.union([objects[0]["mask"], objects[1]["mask"]]), mask_score=0.9))
    return objects


def test_a_group_is_completed_with_the_missed_instances_unless_its_phrase_counts_them():
    objects = group_scene("green plants")
    new = instances.add_instances(objects, "plant", [found((0, 0, 40, 40)), found((100, 50, 150, 90), 0.7)],
                                  {"complete_groups": True})
    group = objects[2]
    assert group["members"] == [0, 1, 3] and group["instances"] == 3 and len(new) == 1
    assert group["box"] == [0.0, 0.0, 150.0, 90.0] and group["mask_score"] == pytest.approx(0.7)
    assert group["area"] == rle.area(group["mask"]) == 2 * 40 * 40 + 50 * 40
    objects += [schema.new_object(**n) for n in new]
    assert instances.others(objects, 2) == []  # every plant is in the group
    assert instances.others(objects, 0) == [[50.0, 0.0, 90.0, 40.0], [100.0, 50.0, 150.0, 90.0]]

    counted = group_scene("two green plants")  # "two": the third is no member, but a rival of the group
    new = instances.add_instances(counted, "plant", [found((100, 50, 150, 90))], {"complete_groups": True})
    counted += [schema.new_object(**n) for n in new]
    assert counted[2]["members"] == [0, 1] and counted[2]["instances"] == 3
    assert instances.others(counted, 2) == [[100.0, 50.0, 150.0, 90.0]]
    assert 3 not in verify.related(counted, 2)
    off = group_scene("green plants")
    instances.add_instances(off, "plant", [found((100, 50, 150, 90))], {"complete_groups": False})
    assert off[2]["members"] == [0, 1]


def test_the_refer_prompt_names_the_other_instances_after_the_image_and_caption():
    plain = prompts.refer_prompt("A cat and a cat.", "a cat", (0, 0, 50, 50), 200, 100)
    told = prompts.refer_prompt("A cat and a cat.", "a cat", (0, 0, 50, 50), 200, 100,
                                other_boxes=[(100, 0, 200, 100)], kind="cat")
    shared = "Image description: A cat and a cat.\n\n"  # image first, then the caption: the prefix of every object
    assert plain.startswith(shared) and told.startswith(shared)
    assert told == shared + "The image also shows other cat instances at <box>[[500, 0, 1000, 1000]]</box>; the " \
                            "expression must fit none of them.\n\n" + plain[len(shared):]
    assert prompts.PROMPTS_VERSION == "gssculpt-4"  # 4: the reasoning prompt (issue 30)


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory):
    from sculpt.testing import tiny_sam3

    return tiny_sam3.write(str(tmp_path_factory.mktemp("sam3") / "sam3"))


def kit_row(name="coffee"):
    """A row of the kit's scene after the mask stage, with box-shaped masks."""
    from sculpt.annotation import groups
    from sculpt.testing import kit, samples

    image = samples.photo(name)
    height, width = image.shape[:2]
    objects = []
    for phrase, boxes in kit.GROUNDING.items():
        start = kit.CAPTION.lower().index(phrase.lower())
        for box in boxes:
            pixels = [(v + 0.5) / 1000 * size for v, size in zip(box, (width, height) * 2)]
            objects.append(schema.new_object(phrase=phrase, phrase_start=start, phrase_end=start + len(phrase), box=pixels,
                                             mask=box_mask(pixels, height, width), mask_score=0.9))
    groups.categorise(objects)
    objects += [schema.new_object(**g) for g in groups.build_groups(objects)]
    return schema.new_row("u", 0, "sa_0", image_bytes=samples.jpeg_bytes(image), width=width, height=height,
                          caption=kit.CAPTION, objects=objects)


def test_the_stage_finds_the_plant_the_caption_missed_with_the_real_loading_code(sam3_dir):
    pytest.importorskip("torch")
    from actors.instances import InstanceFinder
    from sculpt.stage import StageActor
    from sculpt.testing import kit

    before = kit_row()
    out = StageActor(InstanceFinder(model=sam3_dir))(schema.to_table([before])).to_pylist()[0]
    assert out["status"] == "ok", out["error"]
    objects = out["objects"]
    assert len(objects) == len(before["objects"]) + 1  # the named ones are matched, one plant is new
    new = objects[-1]
    assert new["phrase"] == "plant" and new["phrase_start"] is None and new["category"] == "single"
    x0, y0, x1, y1 = kit.UNNAMED["plant"][0]
    assert instances.box_iou(new["box"], [x0 * out["width"] / 1000, y0 * out["height"] / 1000,
                                          x1 * out["width"] / 1000, y1 * out["height"] / 1000]) > 0.8
    assert new["area"] == rle.area(new["mask"]) > 0 and new["mask"]["size"] == [out["height"], out["width"]]
    counts = {o["phrase"]: o["instances"] for o in objects}
    assert counts == {"a gray cat": 1, "a red sofa": 1, "the wooden floor": None, "its long tail": 1,
                      "two green plants": 3, "the window": 1, "plant": 3}
    group = next(o for o in objects if o["members"])
    assert group["members"] == [4, 5]  # "two green plants": counted, not completed
    assert instances.others(objects, objects.index(group)) == [new["box"]]

