"""The listener (actors/listen.py): a second opinion that grounds each expression back to a box, and its place in the
keep rule. No model here: the answers are golden strings or a scripted engine pool."""

import pytest

from actors.listen import Listener
from actors.vlm import image_key
from actors.verify import Verifier
from sculpt import config, schema
from sculpt.annotation import prompts, rle, verify
from sculpt.models import DEFAULT_MODELS
from sculpt.outputs.store import FILTER_SETTINGS


# ---------------------------------------------------------------- the prompt and the answer's box

def test_listener_prompt_golden_has_the_expression_alone():
    assert prompts.listener_prompt("the gray cat on the red sofa") == (
        "Please provide the bounding box coordinate of the region this sentence describes: "
        "<ref>the gray cat on the red sofa</ref>")


@pytest.mark.parametrize("answer, boxes", [
    ("[[100, 100, 500, 1000]]", [[60, 40, 300, 400]]),  # 600x400: each axis by its own size
    ("<ref>the cat</ref><box>[[100,100,500,1000]]</box>", [[60, 40, 300, 400]]),  # InternVL's tagged form
    ("[100, 100, 500, 1000]", [[60, 40, 300, 400]]),  # bare
    ("[[0, 0, 500, 500], [500, 500, 1000, 1000]]", [[0, 0, 300, 200], [300, 200, 600, 400]]),  # several
    ("<box>[[0, 0, 500, 500]]</box> and <box>[[500, 500, 1000, 1000]]</box>", [[0, 0, 300, 200], [300, 200, 600, 400]]),
    ("[[500, 1000, 100, 100]]", [[60, 40, 300, 400]]),  # corners the wrong way round
    ("[[-20, 0, 1200, 1000.0]]", [[0, 0, 600, 400]]),  # clamped to 0..1000
    ("[[250.5, 0, 500, 500]]", [[150.3, 0, 300, 200]]),
    ("[[100, 100, 100, 500]]", []),  # no area
    ("[[100, 100, 500", []),  # cut off
    ("[[1, 2, 3]]", []),
    ("the cat is on the left", []),
    ("", []),
])
def test_text_to_boxes_golden(answer, boxes):
    assert prompts.text_to_boxes(answer, 600, 400) == [pytest.approx(b) for b in boxes]


def test_text_to_boxes_inverts_box_to_text():
    box = (61.0, 158.0, 286.0, 414.0)
    assert prompts.text_to_boxes(prompts.box_to_text(box, 512, 512), 512, 512)[0] == pytest.approx(box, abs=512 / 2000)


def test_listener_iou_is_the_union_of_its_boxes_against_the_target():
    target = [0, 0, 10, 10]
    assert verify.listener_iou([[0, 0, 10, 10]], target) == 1.0
    assert verify.listener_iou([[0, 0, 10, 5]], target) == 0.5
    # "the dog" with two dogs found: their union box is twice the target's
    assert verify.listener_iou([[0, 0, 10, 10], [10, 0, 20, 10]], target) == 0.5
    assert verify.listener_iou([[20, 20, 30, 30]], target) == 0.0
    assert verify.listener_iou([], target) == 0.0  # no box: found nothing there
    third = verify.listener_iou([[0, 0, 10, 10]], [0, 0, 30, 10])
    assert third == float(__import__("numpy").float32(1 / 3))  # as float32 stores it


# ---------------------------------------------------------------- which pairs the listener asks about

def obj(expression, phrase="red cup", box=(0, 0, 5, 5), **fields):
    fields = {"mask": rle.empty(10, 10), "category": "single", **fields}
    return schema.new_object(phrase=phrase, expression=expression, box=list(box) if box else None, **fields)


def test_the_listener_asks_about_pairs_the_text_checks_keep_whatever_their_params():
    objects = [obj("the red cup on the table"),
               obj("the blue cup near the window"), obj("The blue cup near the window."),  # duplicates
               obj("the red cup", phrase="red cup"),  # repeats its phrase
               obj(" . "),  # no words
               obj("a yellow umbrella by the door", box=None, category="negative", phrase=None),
               obj("the green cup on the left", error="refer: x"),
               obj("the green cup on the shelf", mask=None),  # no mask: not a pair
               obj("cup"),  # too short by default, but min_words is a param: asked, the rule rejects it first
               obj("two cups side by side", category="multi", members=[0, 1])]
    assert [i for i in range(len(objects)) if verify.listened(objects, i)] == [0, 8, 9]


# ---------------------------------------------------------------- the stage, on a scripted engine pool

class ScriptedListener(Listener):
    """The listen stage with ``ask`` answered from a script: {expression: answer}."""

    def __init__(self, script, **params):
        super().__init__(**params)
        self.script, self.asked = script, []

    def setup(self):
        pass

    def ask(self, encoded_images, requests, max_tokens):
        self.asked.append((sorted(encoded_images), requests, max_tokens))
        expression = "<ref>(.*)</ref>"
        import re

        return [{"text": self.script[re.search(expression, text).group(1)], "finish_reason": "stop"}
                for _, text in requests]


def row(index, objects, width=100, height=100):
    return schema.new_row("sa_000000", index, f"sa_{index}", width=width, height=height, image_bytes=b"jpeg",
                          objects=objects)


def test_stage_scores_each_asked_pair_and_leaves_the_others_null():
    cat = obj("the gray cat on the red sofa", phrase="a gray cat", box=(12, 31, 56, 81))
    plants = obj("the two green plants by the window", phrase="two green plants", box=(60, 9, 95, 72),
                 category="multi")
    negative = obj("a yellow umbrella by the door", box=None, category="negative", phrase=None)
    duplicates = [obj("the red cup on the table"), obj("the red cup on the table")]
    rows = [row(1, [cat, plants, negative]), row(2, duplicates), row(3, [])]
    answer = "<ref>x</ref><box>[[120, 310, 560, 810]]</box>"  # the cat's box, whatever is asked
    stage = ScriptedListener({cat["expression"]: answer, plants["expression"]: answer})
    stage.process(rows)
    (images, requests, max_tokens), = stage.asked  # one call for the batch
    key = image_key(rows[0])
    assert images == [key] and max_tokens == 96
    assert requests == [(key, prompts.listener_prompt(cat["expression"])),
                        (key, prompts.listener_prompt(plants["expression"]))]
    assert cat["listener_iou"] == pytest.approx(1.0) and plants["listener_iou"] == 0.0
    assert negative["listener_iou"] is None and [d["listener_iou"] for d in duplicates] == [None, None]


def test_an_answer_without_a_box_scores_zero():
    cat = obj("the gray cat on the red sofa", box=(12, 31, 56, 81))
    ScriptedListener({cat["expression"]: "I cannot see it."}).process([row(1, [cat])])
    assert cat["listener_iou"] == 0.0


def test_stage_params_and_defaults():
    assert Listener().params == {"max_tokens": 96, "prompts_version": prompts.PROMPTS_VERSION,
                                 "model": DEFAULT_MODELS["vlm"]}
    assert Listener.model_key == "vlm"
    with pytest.raises(ValueError, match="unknown param"):
        Listener(threshold=0.5)


def test_the_default_chain_listens_after_refer_as_a_client_of_the_engine_pool():
    stages = config.load(None, []).stages
    names = [s.name for s in stages]
    assert names.index("listen") == names.index("refer") + 1 and names.index("listen") < names.index("verify")
    listen = stages[names.index("listen")]
    assert (listen.cpus, listen.gpus, listen.actors, listen.batches_in_flight) == (0.5, 0, 2, 8)


# ---------------------------------------------------------------- the keep rule

def judged(listener_iou, params=None):
    mask = rle.encode(__import__("numpy").ones((4, 4), bool))
    pair = obj("the gray cat on the red sofa", mask=mask, listener_iou=listener_iou)
    verify.judge([pair], 0, mask, {**Verifier().params, **(params or {})})
    return pair


def test_a_pair_the_listener_disagrees_with_is_rejected_and_keeps_its_scores():
    assert judged(0.49)["reject_reason"] == "listener"
    rejected = judged(0.0)
    assert rejected["kept"] is False and rejected["iou"] == 1.0 and rejected["listener_iou"] == 0.0
    assert judged(0.5)["kept"] is True  # inclusive
    assert judged(None)["kept"] is True  # not asked: no opinion
    assert judged(0.3, {"listener_threshold": 0.25})["kept"] is True
    assert judged(0.99, {"listener_threshold": 1.0})["reject_reason"] == "listener"


def test_the_listener_is_checked_after_the_text_checks_and_before_the_masks():
    reasons = verify.REASONS
    assert reasons.index("duplicate_expression") < reasons.index("verify_error") < reasons.index("listener") \
        < reasons.index("low_iou")
    params = Verifier().params
    bad = {"phrase": "cup", "expression": "the red cup on the table", "mask": {}, "iou": 0.1, "rival_iou": 0.0,
           "listener_iou": 0.1, "category": "single"}
    assert verify.reject_reason(bad, params) == "listener"
    assert verify.reject_reason({**bad, "expression": "cup"}, params) == "too_short"
    assert verify.reject_reason({**bad, "listener_iou": 0.9}, params) == "low_iou"
    negative = {**bad, "category": "negative", "iou": None, "verifier_area": 0, "mask": rle.empty(10, 10)}
    assert verify.reject_reason(negative, params) is None  # a negative has no box to agree on


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", None, True, float("nan")])
def test_listener_threshold_is_checked(bad):
    with pytest.raises(ValueError, match="listener_threshold"):
        Verifier(listener_threshold=bad)


def test_the_threshold_is_a_filter_setting_in_the_fingerprint_and_markers():
    assert Verifier().params["listener_threshold"] == verify.DEFAULT_LISTENER_THRESHOLD == 0.5
    assert "listener_threshold" in FILTER_SETTINGS


def test_the_schema_stores_listener_iou_after_verifier_area():
    names = schema.OBJECT_TYPE.names
    assert names[names.index("verifier_area") + 1] == "listener_iou"
    assert schema.OBJECT_TYPE.field("listener_iou").type == "float"


# ---------------------------------------------------------------- the kit's scene

def test_the_kit_listener_disagrees_with_the_scene_group_and_agrees_with_the_cat():
    from sculpt.testing import kit

    width, height = 600, 400
    listener = prompts.text_to_boxes(kit.LISTENER_ANSWER, width, height)

    def pixels(bins):  # Florence-2's location bins, as the ground stage turns them into pixels
        return [(bins[0] + 0.5) * width / 1000, (bins[1] + 0.5) * height / 1000,
                (bins[2] + 0.5) * width / 1000, (bins[3] + 0.5) * height / 1000]

    plants = [pixels(b) for b in kit.GROUNDING["two green plants"]]
    union = [min(b[0] for b in plants), min(b[1] for b in plants), max(b[2] for b in plants), max(b[3] for b in plants)]
    assert verify.listener_iou(listener, union) == 0.0
    assert verify.listener_iou(listener, pixels(kit.GROUNDING["a gray cat"][0])) > 0.99
