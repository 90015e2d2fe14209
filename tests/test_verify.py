"""The noise filter: IoU and keep/drop on hand-made masks, the text checks and the order of the keep rule on golden
strings, and the verify stage driven without Ray."""

import numpy as np
import pytest

from actors.verify import Verifier
from sculpt.annotation import rle, verify
from sculpt.testing import samples
from sculpt import schema
from sculpt.stage import StageActor


def mask(shape, *cells):
    """A bool mask with the given (row, col) cells set."""
    out = np.zeros(shape, dtype=bool)
    for r, c in cells:
        out[r, c] = True
    return out


PARAMS = {"threshold": 0.5, "margin": 0.1, "listener_threshold": 0.5, "negative_area": 0.01, "min_words": 3,
          "max_words": 40, "duplicate_similarity": 1.0, "reasoning_threshold": 0.5}  # the stage's defaults


def judged(evf, sam, threshold=0.5, margin=0.1):
    obj = {"mask": rle.encode(sam), "expression": "the square patch"}
    verify.judge([obj], 0, rle.encode(evf), {**PARAMS, "threshold": threshold, "margin": margin})
    return obj


def test_iou_golden_values_and_threshold_is_inclusive():
    sam = mask((4, 4), (0, 0), (0, 1), (1, 0), (1, 1))
    assert judged(sam, sam) == {**judged(sam, sam), "iou": 1.0, "kept": True}
    half = mask((4, 4), (0, 0), (0, 1))  # 2 of 4 pixels, nothing outside: IoU exactly 0.5
    assert judged(half, sam)["iou"] == 0.5 and judged(half, sam)["kept"] is True
    assert judged(half, sam, threshold=0.51)["kept"] is False
    third = mask((4, 4), (0, 1), (0, 2))  # vs (0,0),(0,1): 1 shared of 3
    assert judged(third, mask((4, 4), (0, 0), (0, 1)))["iou"] == pytest.approx(1 / 3)
    assert judged(third, mask((4, 4), (0, 0), (0, 1)))["kept"] is False
    assert judged(third, mask((4, 4), (0, 0), (0, 1)), threshold=1 / 3)["kept"] is True
    outside = mask((4, 4), (3, 3))
    assert judged(outside, sam)["iou"] == 0.0 and judged(outside, sam)["kept"] is False


def test_empty_masks_have_iou_zero_and_are_dropped():
    empty, sam = np.zeros((3, 5), bool), mask((3, 5), (1, 1))
    assert judged(empty, sam) == {**judged(empty, sam), "iou": 0.0, "kept": False}
    assert judged(sam, empty)["iou"] == 0.0
    assert judged(empty, empty) == {**judged(empty, empty), "iou": 0.0, "kept": False}
    assert judged(empty, empty, threshold=0.0, margin=0.0)["kept"] is True  # threshold and margin 0 keep everything


def test_kept_agrees_with_the_float32_iou_that_is_written():
    # IoU 2/3 is not a float32; kept must follow the stored value, not the float64 one.
    sam = mask((1, 3), (0, 0), (0, 1), (0, 2))
    obj = judged(mask((1, 3), (0, 0), (0, 1)), sam, threshold=float(np.float32(2 / 3)))
    assert obj["iou"] == float(np.float32(2 / 3)) and obj["kept"] is True


def test_size_mismatch_is_an_object_error():
    obj = judged(np.ones((2, 2), bool), np.ones((2, 3), bool))
    assert obj["iou"] is None and obj["kept"] is False and obj["error"].startswith("verify: masks of different sizes")


def two_dogs():
    """Two disjoint dogs (2 px each) of a 4x4 image, and the group of both."""
    a, b = mask((4, 4), (0, 0), (0, 1)), mask((4, 4), (3, 2), (3, 3))
    objects = [{"mask": rle.encode(a), "expression": "the dog on the left"},
               {"mask": rle.encode(b), "expression": "the brown dog"},
               {"mask": rle.encode(a | b), "expression": "both of the dogs", "members": [0, 1], "category": "multi"}]
    return objects, a, b


def test_a_reference_that_fits_another_object_as_well_is_ambiguous():
    objects, a, b = two_dogs()
    verify.judge(objects, 1, rle.encode(a | b), PARAMS)  # "the brown dog": the verifier draws both
    assert objects[1]["iou"] == 0.5 and objects[1]["rival_iou"] == 0.5
    assert objects[1]["kept"] is False and objects[1]["reject_reason"] == "rival"  # IoU >= 0.5; the margin rejects
    verify.judge(objects, 0, rle.encode(a), PARAMS)  # its own dog only
    assert (objects[0]["iou"], objects[0]["rival_iou"], objects[0]["kept"], objects[0]["reject_reason"]) == (
        1.0, 0.0, True, None)
    verify.judge(objects, 2, rle.encode(a | b), PARAMS)  # the group: its members are not its rivals
    assert (objects[2]["iou"], objects[2]["rival_iou"], objects[2]["kept"]) == (1.0, 0.0, True)
    verify.judge(objects, 0, rle.encode(a), {**PARAMS, "margin": 1.0})
    assert objects[0]["kept"] is True  # 1.0 - 0.0 >= 1.0: the margin is inclusive
    assert verify.related(objects, 0) == {0, 2} and verify.related(objects, 2) == {0, 1, 2}


def test_a_negative_is_kept_only_when_the_verifier_draws_nearly_nothing():
    height, width = 20, 50  # 1 % of the image: 10 pixels
    negative = {"mask": rle.empty(height, width), "expression": "a yellow umbrella", "category": "negative"}
    for pixels, kept in ((0, True), (10, True), (11, False), (500, False)):
        drawn = np.zeros((height, width), bool)
        drawn.flat[:pixels] = True
        verify.judge([negative], 0, rle.encode(drawn), PARAMS)
        assert (negative["verifier_area"], negative["kept"], negative["iou"]) == (pixels, kept, None)
        assert negative["reject_reason"] == (None if kept else "negative_drawn")


def test_split_picks_pairs_and_blank_expressions():
    m = rle.encode(np.ones((2, 2), bool))
    objects = [
        {"mask": m, "expression": "the dog"},
        {"mask": m, "expression": None},  # refer failed: not a pair, left alone
        {"mask": None, "expression": "the cat"},
        {"mask": m, "expression": "  "},
    ]
    assert verify.split(objects) == ([0], [3])
    assert verify.split(None) == ([], [])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_threshold_is_checked(bad):
    with pytest.raises(ValueError, match="threshold"):
        verify.check_threshold(bad)
    with pytest.raises(ValueError, match="threshold"):
        Verifier(threshold=bad)


def test_unknown_params_are_refused_and_defaults_are_in_the_fingerprint():
    with pytest.raises(ValueError, match=r"unknown param\(s\) \['treshold'\]"):
        Verifier(treshold=0.5)
    stage = Verifier()
    assert stage.params == {"model": "YxZhang/evf-sam2", **PARAMS, "semantic": [], "prefix": "", "keep_masks": False,
                            "device": None, "dtype": None}
    assert Verifier(model="YxZhang/evf-sam2-multitask").params["semantic"] == ["stuff", "part"]
    assert stage.model_id == "YxZhang/evf-sam2" and stage.describe()["params"]["threshold"] == 0.5


# ---------------------------------------------------------------- the text checks and the rule's order


def test_words_lower_case_and_drop_punctuation_and_articles():
    assert verify.words("The dog, on the LEFT.") == ("dog", "on", "left")
    assert verify.words("An apple; a pear!") == ("apple", "pear")
    assert verify.words("the . a") == () and verify.words(None) == () and verify.words("") == ()


def test_near_same_is_equal_words_or_a_stated_similarity():
    left, right = verify.words("the dog on the left side of the red sofa"), verify.words("the dog on the right side of the red sofa")
    assert verify.near_same(verify.words("The dog on the left."), verify.words("a dog on the left"), 1.0)
    assert not verify.near_same(left, right, 1.0)  # the default: equal words only
    assert difflib_ratio(left, right) == pytest.approx(12 / 14)  # 6 of 7 words in place
    assert verify.near_same(left, right, 0.85) and not verify.near_same(left, right, 0.9)
    assert not verify.near_same(verify.words("the cat left of the dog"), verify.words("the dog left of the cat"), 0.9)


def difflib_ratio(a, b):
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio()


def pair(expression, phrase="red cup", iou=0.9, rival_iou=0.0, **fields):
    return {"phrase": phrase, "expression": expression, "mask": rle.empty(10, 10), "iou": iou, "rival_iou": rival_iou,
            "verifier_area": 0, "category": "single", **fields}


@pytest.mark.parametrize("obj, reason", [
    (pair("the red cup on the table"), None),
    (pair(" . "), "no_expression"),
    (pair("the the the"), "no_expression"),  # nothing but articles
    (pair("red mug"), "too_short"),  # 2 words < min_words 3
    (pair(" ".join(["word"] * 41)), "too_long"),  # > max_words 40
    (pair(" ".join(["word"] * 40)), None),  # the bounds are inclusive
    (pair("The red cup.", phrase="the red cup"), "repeats_phrase"),
    (pair("a RED, cup!", phrase="red cup"), "repeats_phrase"),
    (pair("the red cup on the table", error="verify: masks of different sizes", iou=None), "verify_error"),
    (pair("the red cup on the table", iou=0.49), "low_iou"),
    (pair("the red cup on the table", iou=0.49, listener_iou=0.49), "listener"),  # tests/test_listen.py has more
    (pair("the red cup on the table", listener_iou=0.5), None),
    (pair("the red cup on the table", iou=0.625, rival_iou=0.53125), "rival"),  # beats it by 0.09375 < 0.1
    (pair("the red cup on the table", iou=0.625, rival_iou=0.5), None),
    (pair("a yellow umbrella by the door", category="negative", iou=None, verifier_area=2), "negative_drawn"),
    (pair("a yellow umbrella by the door", category="negative", iou=None, verifier_area=1), None),  # 1 % of 100 px
    (pair("red cup here", phrase="", category="negative", iou=None, verifier_area=0), None),  # no phrase to repeat
])
def test_each_check_rejects_its_golden_case(obj, reason):
    assert verify.reject_reason(obj, PARAMS) == reason


def test_the_first_failed_check_is_the_reason_in_one_fixed_order():
    assert verify.REASONS == ("no_expression", "too_short", "too_long", "repeats_phrase", "duplicate_expression",
                              "verify_error", "listener", "low_iou", "rival", "negative_drawn", "unkept_target")
    worst = pair("red cup", phrase="red cup", iou=0.0, rival_iou=1.0)  # fails every check but the negative's
    assert verify.reject_reason(worst, PARAMS, duplicate=True) == "too_short"
    loose = {**PARAMS, "min_words": 1}
    assert verify.reject_reason(worst, loose, duplicate=True) == "repeats_phrase"
    assert verify.reject_reason({**worst, "phrase": "mug"}, loose, duplicate=True) == "duplicate_expression"
    assert verify.reject_reason({**worst, "phrase": "mug"}, loose) == "low_iou"
    assert verify.reject_reason({**worst, "phrase": "mug", "iou": 0.9}, loose) == "rival"
    assert verify.reject_reason({**worst, "error": "verify: x"}, {**loose, "max_words": 1}) == "too_long"


def test_two_targets_with_the_same_expression_are_both_rejected_and_keep_their_scores():
    a, b, c = mask((4, 4), (0, 0)), mask((4, 4), (3, 3)), mask((4, 4), (1, 1), (1, 2))
    objects = [{"phrase": "cup", "mask": rle.encode(a), "expression": "The red cup on the table."},
               {"phrase": "cup", "mask": rle.encode(b), "expression": "the red cup on a table"},
               {"phrase": "cup", "mask": rle.encode(c), "expression": "the blue cup on the table"},
               {"phrase": "cup", "mask": None, "expression": "the blue cup on the table"}]  # no mask: not a pair
    for i, drawn in enumerate((a, b, c)):
        verify.judge(objects, i, rle.encode(drawn), PARAMS)
    assert [(o["iou"], o["kept"], o["reject_reason"]) for o in objects[:3]] == [
        (1.0, False, "duplicate_expression"), (1.0, False, "duplicate_expression"), (1.0, True, None)]
    assert verify.duplicated(objects, 2, 1.0) is False and verify.duplicated(objects, 2, 0.5) is True


@pytest.mark.parametrize("params, message", [
    ({"min_words": -1}, "min_words must be a whole number"),
    ({"max_words": 2.5}, "max_words must be a whole number"),
    ({"min_words": 5, "max_words": 4}, r"max_words \(4\) is below min_words \(5\)"),
    ({"duplicate_similarity": 1.2}, "duplicate_similarity must be a number in"),
])
def test_text_check_params_are_checked(params, message):
    with pytest.raises(ValueError, match=message):
        Verifier(**params)


# ---------------------------------------------------------------- the stage, with a stand-in for EVF-SAM2


class Scripted:
    """Stands in for the EVF-SAM2 predictor: the mask for an expression is looked up in a dict."""

    device = "cpu"

    def __init__(self, masks):
        self.masks, self.calls = masks, []

    def predict(self, image, expressions):
        import torch

        self.calls.append(list(expressions))
        if "boom" in expressions:
            raise RuntimeError("model failed")
        if "oom once" in expressions and self.calls.count(list(expressions)) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return np.stack([self.masks[e](image.shape[:2]) for e in expressions])

    def predict_tensor(self, image, expressions):
        import torch

        return torch.from_numpy(self.predict(image, expressions))


class ScriptedVerifier(Verifier):
    def __init__(self, script, **params):
        super().__init__(**params)
        self.script = script

    def setup(self):
        self.model = Scripted(self.script)


def full(shape):
    return np.ones(shape, bool)


def left_quarter(shape):
    out = np.zeros(shape, bool)
    out[:, : shape[1] // 4] = True
    return out


def row_with(image, *objects, key="a"):
    height, width = image.shape[:2]
    return schema.new_row("u", 0, key, image_bytes=samples.jpeg_bytes(image), width=width, height=height, objects=list(objects))


def test_stage_records_iou_for_every_pair_kept_or_not():
    image = samples.photo("chelsea")
    shape = image.shape[:2]
    sam_full = rle.encode(full(shape))
    rows = [
        row_with(
            image,
            {"phrase": "cat", "mask": sam_full, "expression": "whole", "kept": True},
            {"phrase": "cat", "mask": sam_full, "expression": "quarter", "kept": True},
            {"phrase": "cat", "mask": sam_full, "expression": None},
            {"phrase": "cat", "mask": sam_full, "expression": ""},
        ),
        row_with(image, {"phrase": "x", "mask": sam_full, "expression": "boom"}, key="b"),
        row_with(image, key="c"),  # no objects: the model is not called
    ]
    # all masks alike: no rivalry; one-word expressions pass
    stage = ScriptedVerifier({"whole": full, "quarter": left_quarter}, margin=0.0, min_words=1)
    actor = StageActor(stage)
    out = actor(schema.to_table(rows)).to_pylist()
    first = out[0]["objects"]
    assert first[0]["iou"] == 1.0 and first[0]["kept"] is True and first[0]["reject_reason"] is None
    assert first[1]["iou"] == pytest.approx((shape[1] // 4) / shape[1], abs=1e-6) and first[1]["kept"] is False
    assert first[1]["reject_reason"] == "low_iou"
    assert first[2]["iou"] is None and first[2]["kept"] is None and first[2]["reject_reason"] is None  # not a pair
    assert first[3]["kept"] is False and first[3]["error"] == "verify: blank referring expression"
    assert first[3]["reject_reason"] == "no_expression"
    assert out[0]["status"] == "ok" and out[2]["status"] == "ok"
    assert out[1]["status"] == "error" and out[1]["error"] == "verify: RuntimeError: model failed"
    assert stage.model.calls == [["whole", "quarter"], ["boom"]]  # one batched call per image


def test_an_out_of_memory_error_is_retried_not_written_as_the_images_error():
    image = samples.photo("chelsea")
    sam_full = rle.encode(full(image.shape[:2]))
    rows = [row_with(image, {"phrase": "cat", "mask": sam_full, "expression": "whole"}),
            row_with(image, {"phrase": "cat", "mask": sam_full, "expression": "oom once"}, key="b")]
    stage = ScriptedVerifier({"whole": full, "oom once": full}, margin=0.0)
    out = StageActor(stage, attempts=2, backoff_seconds=0.0)(schema.to_table(rows)).to_pylist()
    assert stage.model.calls == [["whole"], ["oom once"], ["whole"], ["oom once"]]  # the batch, then again
    assert [r["status"] for r in out] == ["ok", "ok"] and not any(r["transient_error"] for r in out)
    assert [r["objects"][0]["iou"] for r in out] == [1.0, 1.0]


def test_stage_marks_an_undecodable_image():
    good = rle.encode(full((4, 4)))
    row = schema.new_row("u", 0, "a", image_bytes=b"not an image", width=4, height=4,
                         objects=[{"mask": good, "expression": "whole"}])
    out = StageActor(ScriptedVerifier({"whole": full}))(schema.to_table([row])).to_pylist()
    assert out[0]["status"] == "error" and out[0]["error"].startswith("verify: ImageError")


# ---------------------------------------------------------------- the stage with the tiny EVF-SAM2 checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    pytest.importorskip("sam2")
    from sculpt.testing import tiny_evf_sam2

    return tiny_evf_sam2.write(str(tmp_path_factory.mktemp("evf") / "evf-sam2-tiny"))


def test_stage_with_tiny_evf_sam2(tiny_checkpoint):
    from sculpt.models import evf_sam2

    image = samples.photo("astronaut")[:200, :300]
    shape = image.shape[:2]
    expressions = ["the man in a white suit", "the flag top left", "sky"]
    objects = [{"phrase": "thing", "mask": rle.encode(left_quarter(shape)), "expression": e} for e in expressions]
    for threshold in (0.0, 0.5, 1.0):
        rows = [row_with(image, *[dict(o) for o in objects])]
        stage = Verifier(model=tiny_checkpoint, threshold=threshold, margin=0.0, min_words=1)
        out = StageActor(stage)(schema.to_table(rows)).to_pylist()
        got = out[0]["objects"]
        assert out[0]["status"] == "ok"
        assert all(0 <= o["iou"] <= 1 and o["kept"] == (o["iou"] >= threshold) for o in got)
    # The stage's IoU is the IoU of the module's own masks with the SAM2 masks.
    from sculpt.annotation import images as img

    decoded = img.load_rgb(samples.jpeg_bytes(image))
    masks = evf_sam2.load(tiny_checkpoint).predict(decoded, expressions)
    expected = [rle.iou(rle.encode(m), rle.encode(left_quarter(shape))) for m in masks]
    assert [o["iou"] for o in got] == pytest.approx(expected, abs=1e-6)


def test_building_the_stage_imports_no_model_framework():
    import subprocess
    import sys

    code = "import sys, actors.verify as v; v.Verifier(); print(sorted(m for m in ('torch', 'transformers', 'sam2') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_kept_verifier_masks_let_anyone_recompute_the_filter(tmp_path):
    """With keep_masks, SAM2's masks scored against the verifier's own masks by a GSEval-style reader (mean mask
    IoU over idx-matched lines) give the mean of the IoUs the filter recorded."""
    import json

    from sculpt.outputs import export
    from sculpt.outputs.store import OutputStore
    from sculpt.outputs.units import UnitWriter
    from tests.test_export import gseval_giou

    image = samples.photo("chelsea")
    shape = image.shape[:2]
    row = row_with(image, {"phrase": "cat", "mask": rle.encode(full(shape)), "expression": "quarter"},
                   {"phrase": "cat", "mask": rle.encode(left_quarter(shape)), "expression": "whole"})
    out = StageActor(ScriptedVerifier({"whole": full, "quarter": left_quarter}, keep_masks=True, margin=0.0))(
        schema.to_table([row])).to_pylist()
    objects = out[0]["objects"]
    assert all(o["verifier_mask"] and o["iou"] is not None for o in objects)
    for o in objects:
        assert o["iou"] == pytest.approx(rle.iou(o["verifier_mask"], o["mask"]), abs=1e-6)

    store = OutputStore(str(tmp_path / "out"))
    job = {"fingerprint": "f", "settings": {}, "model_ids": {}, "prompts_version": "p"}
    store.prepare(job)
    writer = UnitWriter(store, "sa_000000", job)
    writer.add(schema.to_table([{**out[0], "shard": "sa_000000", "unit_end": {"size": 1, "bytes_read": 1}}]))
    writer.commit()
    export.export(str(tmp_path / "out"), str(tmp_path / "gt.jsonl"), "gseval", keep_all=True)
    lines = [json.loads(line) for line in open(tmp_path / "gt.jsonl")]
    with open(tmp_path / "verifier.jsonl", "w") as f:  # the verifier's masks as the predictions
        for line in lines:
            f.write(json.dumps({**line, "segmentation": objects[line["object"]]["verifier_mask"]}) + "\n")
    giou, scored, _ = gseval_giou(str(tmp_path / "gt.jsonl"), str(tmp_path / "verifier.jsonl"))
    assert scored == 2 and giou == pytest.approx(np.mean([o["iou"] for o in objects]), abs=1e-6)
