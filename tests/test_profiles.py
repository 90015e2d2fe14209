"""VLM profiles (issue 29): each family's box convention in and out, golden, and how a profile is chosen."""

import json

import pytest

from sculpt.annotation import profiles, prompts
from sculpt.annotation.profiles import INTERNVL, QWEN2_5_VL, QWEN2_VL, QWEN3_VL

# A non-square image (640 x 480) and a box of it; Qwen2.5-VL's resized input of it under Qwen2.5-VL's own processor
# settings (14-px patches merged 2 x 2, at most 12845056 pixels): 644 x 476 (each side rounded to a multiple of 28).
W, H, BOX = 640, 480, (64, 48, 320, 240)
INPUT = (644, 476)
# An image larger than that limit (8000 x 6000 = 48 Mpx): its resized input is 4116 x 3080 (scaled down to fit, each
# side floored to a multiple of 28).
BIG_W, BIG_H, BIG_INPUT = 8000, 6000, (4116, 3080)


@pytest.mark.parametrize("profile, text", [
    (INTERNVL, "[[100, 100, 500, 500]]"),
    (QWEN2_VL, "<|box_start|>(100,100),(500,500)<|box_end|>"),
    (QWEN3_VL, '{"bbox_2d": [100, 100, 500, 500]}'),
    (QWEN2_5_VL, '{"bbox_2d": [64, 48, 322, 238]}'),  # pixels of the 644 x 476 input
])
def test_a_box_is_written_in_each_family_convention(profile, text):
    assert profile.box_to_text(BOX, W, H, INPUT) == text
    assert prompts.box_to_text(BOX, W, H, profile=profile, input_size=INPUT) == text


def test_a_box_of_an_image_larger_than_the_resize_limit_is_in_pixels_of_the_smaller_input():
    box = (800, 600, 4000, 3000)  # a tenth and a half of each side
    assert QWEN2_5_VL.box_to_text(box, BIG_W, BIG_H, BIG_INPUT) == '{"bbox_2d": [412, 308, 2058, 1540]}'
    [back] = QWEN2_5_VL.text_to_boxes('{"bbox_2d": [412, 308, 2058, 1540]}', BIG_W, BIG_H, BIG_INPUT)
    assert back == pytest.approx([412 / 4116 * 8000, 308 / 3080 * 6000, 2058 / 4116 * 8000, 1540 / 3080 * 6000])
    assert back == pytest.approx(box, abs=8000 / 4116 / 2)  # within half a pixel of the input
    assert QWEN3_VL.box_to_text(box, BIG_W, BIG_H) == '{"bbox_2d": [100, 100, 500, 500]}'  # relative: no input size
    with pytest.raises(ValueError, match="input_size"):
        QWEN2_5_VL.box_to_text(box, BIG_W, BIG_H)


@pytest.mark.parametrize("profile, answer", [
    (INTERNVL, "<ref>the cat</ref><box>[[100, 100, 500, 500]]</box>"),
    (QWEN2_VL, "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>"),
    (QWEN3_VL, '```json\n[\n\t{"bbox_2d": [100, 100, 500, 500], "label": "the cat"}\n]\n```'),
    (QWEN2_5_VL, '```json\n[\n\t{"bbox_2d": [64, 48, 322, 238], "label": "the cat"}\n]\n```'),
])
def test_an_answer_in_each_family_convention_is_read_back_in_image_pixels(profile, answer):
    [box] = prompts.text_to_boxes(answer, W, H, profile=profile, input_size=INPUT)
    assert box == pytest.approx(BOX, abs=0.6)  # Qwen2.5-VL: within the input's pixel of rounding
    assert profile.text_to_boxes("I cannot find it.", W, H, INPUT) == []


@pytest.mark.parametrize("profile", list(profiles.PROFILES.values()))
def test_boxes_round_trip_through_each_convention(profile):
    import random

    rng = random.Random(0)
    for width, height, size in ((640, 480, INPUT), (300, 700, (308, 700)), (BIG_W, BIG_H, BIG_INPUT)):
        for _ in range(50):
            x0, y0 = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
            box = (x0, y0, rng.uniform(x0 + width * 0.05, width), rng.uniform(y0 + height * 0.05, height))
            [back] = profile.text_to_boxes(profile.box_to_text(box, width, height, size), width, height, size)
            # one unit of the convention: a thousandth of the side, or one pixel of the resized input
            units = (width / 1000, height / 1000) if profile.relative else (width / size[0], height / size[1])
            for v, w, unit in zip(box, back, units * 2):
                assert abs(v - w) <= unit / 2 + 1e-9
        several = [(0, 0, width / 2, height / 2), (width / 2, height / 2, width, height)]
        back = profile.text_to_boxes(profile.boxes_to_text(several, width, height, size), width, height, size)
        assert len(back) == 2 and all(b == pytest.approx(s, abs=max(width, height) / 500) for b, s in zip(back, several))


def test_answers_are_clamped_put_right_and_boxes_without_area_dropped():
    assert QWEN3_VL.text_to_boxes('{"bbox_2d": [500, 600, -10, 1200]}', 1000, 500) == [[0.0, 300.0, 500.0, 500.0]]
    assert QWEN2_5_VL.text_to_boxes('{"bbox_2d": [700, 10, 30, 10]}', 640, 480, INPUT) == []
    assert QWEN2_VL.text_to_boxes("<|box_start|>(0,0),(1000,1000)<|box_end|>", 10, 20) == [[0.0, 0.0, 10.0, 20.0]]
    # a JSON answer's bbox_2d lists win over other lists of four numbers in it; without any, the bare lists count
    assert QWEN3_VL.text_to_boxes('{"bbox_2d": [0, 0, 500, 500], "rgb": [1, 2, 3, 4]}', 100, 100) == [[0, 0, 50, 50]]
    assert QWEN3_VL.text_to_boxes("[0, 0, 500, 500]", 100, 100) == [[0, 0, 50, 50]]


def test_internvl_prompts_are_unchanged_by_profiles():
    """Every prompt of an InternVL job is the one it was before profiles, byte for byte (its outputs keep their
    fingerprint and its kit its training)."""
    text = prompts.refer_prompt("A cat.", "the cat", BOX, W, H, other_boxes=[(0, 0, 64, 48)], kind="cat")
    assert "other cat instances at <box>[[0, 0, 100, 100]]</box>" in text
    assert "for <ref>the cat</ref><box>[[100, 100, 500, 500]]</box>. Use" in text
    group = prompts.refer_prompt("A cat.", "two cats", BOX, W, H, member_boxes=[BOX, (0, 0, 64, 48)])
    assert "all of <ref>two cats</ref><box>[[100, 100, 500, 500], [0, 0, 100, 100]]</box> together" in group
    assert prompts.listener_prompt("the cat") == prompts.LISTENER_PROMPT.format(expression="the cat")


@pytest.mark.parametrize("profile", [QWEN2_VL, QWEN2_5_VL, QWEN3_VL])
def test_each_family_is_asked_in_its_own_words_with_the_same_prompts(profile):
    members = [BOX, (0, 0, 64, 48)]
    for text in (prompts.refer_prompt("A {cat}.", "the cat", BOX, W, H, other_boxes=[(0, 0, 64, 48)], kind="cat",
                                      profile=profile, input_size=INPUT),
                 prompts.refer_prompt("A {cat}.", "two cats", BOX, W, H, member_boxes=members, profile=profile,
                                      input_size=INPUT)):
        assert "<ref>" not in text and "<box>" not in text and text.startswith("Image description: A {cat}.\n\n")
        assert "Do not mention the box" in text or "Do not mention the boxes" in text
        found = profile.text_to_boxes(text, W, H, INPUT)  # the boxes the prompt carries, read back
        assert len(found) == 2
        for box, expected in zip(found, (members[1], BOX) if "other" in text else members):
            assert box == pytest.approx(expected, abs=0.6)
    listener = prompts.listener_prompt("the cat on the sofa", profile)
    assert "the cat on the sofa" in listener and "<ref>" not in listener
    assert ("JSON" in listener) == (profile.style == "json")


@pytest.mark.parametrize("config, model, expected", [
    ({"model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"]}, "x/InternVL3-1B-hf", INTERNVL),
    ({"model_type": "internvl_chat"}, "OpenGVLab/InternVL2_5-1B", INTERNVL),
    ({"model_type": "qwen2_5_vl"}, "", QWEN2_5_VL),
    ({"model_type": "qwen3_vl"}, "", QWEN3_VL),
    ({"model_type": "qwen3_vl_moe"}, "", QWEN3_VL),
    ({"model_type": "qwen2_vl"}, "", QWEN2_VL),
    ({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}, "", QWEN2_5_VL),
    (None, "Qwen/Qwen2.5-VL-7B-Instruct", QWEN2_5_VL),  # an endpoint's served name, a Hub id not fetched
    (None, "Qwen/Qwen3-VL-8B-Instruct", QWEN3_VL),
    (None, "Qwen/Qwen2-VL-2B-Instruct", QWEN2_VL),
    ({}, "my-model", INTERNVL),  # nothing says: sculpt's default family
])
def test_a_profile_is_chosen_from_the_checkpoint_config(config, model, expected):
    assert profiles.profile_for(config, model) is expected
    assert profiles.get("auto", config, model) is expected
    assert profiles.get("qwen2_vl", config, model) is QWEN2_VL  # vlm.profile overrides what the checkpoint says


def test_the_profile_is_set_in_the_config_and_recorded_in_the_fingerprint(tmp_path):
    from sculpt import config
    from sculpt.engine import planning, vlm

    model = tmp_path / "qwen"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_vl"}))
    assert vlm.profile_of("auto", str(model)) is QWEN3_VL
    assert vlm.tiling_kwargs("qwen3_vl", 6, 1) == {} and vlm.tiling_kwargs("internvl", 2, 1)["max_patches"] == 2

    def record(*items):
        cfg = config.load(None, [f"models.vlm={model}", *items])
        stages = config.build_stages(cfg)
        job = planning.job_record(cfg, stages)
        assert {s.profile for s in stages if s.model_key == "vlm"} == {job["vlm_profile"].rsplit("-", 1)[0]}
        return job

    auto, named = record(), record("vlm.profile=qwen2_5_vl")
    assert auto["vlm_profile"] == "qwen3_vl-1" and auto["settings"]["vlm"]["profile"] == "qwen3_vl-1"
    assert named["vlm_profile"] == "qwen2_5_vl-1" and named["fingerprint"] != auto["fingerprint"]
    # InternVL's jobs keep the fingerprint they had before profiles (no profile in their settings)
    internvl = record("vlm.profile=internvl")
    assert internvl["vlm_profile"] == "internvl-1" and "profile" not in internvl["settings"]["vlm"]
    with pytest.raises(config.ConfigError, match="profile"):
        config.load(None, ["vlm.profile=llava"])


def test_the_resize_rule_is_the_image_processor_own(tmp_path):
    """Qwen2.5-VL's boxes are in pixels of its resized input: the stage computes that size by the checkpoint's
    processor's own rule, which is what the processor does to a non-square image and to one past its pixel limit."""
    pytest.importorskip("transformers")
    import numpy as np
    from PIL import Image

    from actors.vlm import resized_input
    from sculpt.testing import tiny_qwen_vl

    tokenizer = tiny_qwen_vl._tokenizer("qwen2_5_vl")
    processor = tiny_qwen_vl._processor("qwen2_5_vl", tokenizer)
    processor.save_pretrained(tmp_path)
    rule = resized_input(str(tmp_path))
    most = tiny_qwen_vl.pixel_bounds("qwen2_5_vl")[2]
    assert 90 * 250 < most < 600 * 400 < 2000 * 1500  # non-square within the tiny processor's limit, and past it
    for width, height in ((600, 400), (90, 250), (2000, 1500)):
        grid = processor.image_processor(images=[Image.fromarray(np.zeros((height, width, 3), np.uint8))],
                                         return_tensors="np")["image_grid_thw"][0]
        assert rule(width, height) == (grid[2] * 14, grid[1] * 14)
        assert rule(width, height)[0] * rule(width, height)[1] <= most
    assert rule(600, 400) == (252, 168)
