"""The device/dtype policy, and every torch model stage in bfloat16 and float16 on the CPU through the code path
CUDA takes (weights in the dtype for Florence-2, float32 weights under autocast for SAM2 and EVF-SAM2).

Tolerances against float32 on the same inputs (tiny random weights, whose logits sit near the mask threshold, so
these are looser than real weights would need): mask IoU >= 0.9 per mask, SAM2 scores within 0.05; Florence-2
decoder logits within 5 % of their range.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from actors.ground import Grounder  # noqa: E402
from actors.mask import Masker  # noqa: E402
from sculpt.models import precision  # noqa: E402
from sculpt.annotation import rle
from sculpt.testing import samples
from sculpt import schema
from sculpt.stage import StageActor  # noqa: E402

REDUCED = ["bfloat16", "float16"]


def test_policy_defaults_and_refusals(monkeypatch):
    assert precision.resolve("cpu") == ("cpu", "float32")
    assert precision.resolve("cpu", "bfloat16") == ("cpu", "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve() == ("cuda", "bfloat16")
    # e.g. V100, T4: torch says they support bfloat16, by emulation
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert precision.resolve() == ("cuda", "float16")
    with pytest.raises(ValueError, match="expected one of float32, bfloat16, float16"):
        precision.resolve("cpu", "half")


def iou(a, b):
    return float((a & b).sum() / max((a | b).sum(), 1))


def row(name, index, boxes=(), caption=None):
    image = samples.photo(name)
    out = schema.new_row("u", index, f"sa_{index}", image_bytes=samples.jpeg_bytes(image, quality=95),
                         width=image.shape[1], height=image.shape[0], caption=caption)
    out["objects"] = [{"phrase": f"thing {i}", "box": [float(v) for v in box]} for i, box in enumerate(boxes)]
    return out


@pytest.fixture(scope="module")
def evf(tmp_path_factory):
    from sculpt.testing import tiny_evf_sam2

    return tiny_evf_sam2.write(str(tmp_path_factory.mktemp("evf") / "evf-sam2-tiny"))


@pytest.mark.parametrize("dtype", REDUCED)
def test_evf_sam2_predicts_in_reduced_precision(evf, dtype):
    from sculpt.models import evf_sam2

    image = samples.photo("chelsea")
    expressions = ["a cat", "the left ear of the cat", "the wall behind it"]
    reference = evf_sam2.load(evf, device="cpu", dtype="float32").predict(image, expressions)
    predictor = evf_sam2.load(evf, device="cpu", dtype=dtype)
    assert next(predictor.model.parameters()).dtype == torch.float32  # weights stay float32; autocast does the rest
    masks = predictor.predict(image, expressions)
    assert masks.shape == reference.shape == (3, *image.shape[:2])
    assert reference.any(axis=(1, 2)).all()  # the comparison compares something
    assert min(iou(a, b) for a, b in zip(masks, reference)) >= 0.9


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory):
    from sculpt.testing import tiny_sam2

    return tiny_sam2.write(str(tmp_path_factory.mktemp("sam2") / "sam2"))


@pytest.mark.parametrize("dtype", REDUCED)
def test_masker_in_reduced_precision(sam2_dir, dtype):
    boxes = [[10, 20, 200, 250], [150, 40, 451, 300], [0, 0, 451, 300]]
    out = {d: StageActor(Masker(model=sam2_dir, dtype=d))(schema.to_table([row("chelsea", 0, boxes)])).to_pylist()[0]
           for d in ("float32", dtype)}
    assert out[dtype]["status"] == out["float32"]["status"] == "ok", out[dtype]["error"]
    reduced, full = out[dtype]["objects"], out["float32"]["objects"]
    assert len(reduced) == len(full) == 3 and all(o["mask"] for o in reduced)
    for a, b in zip(reduced, full):
        assert iou(rle.decode(a["mask"]), rle.decode(b["mask"])) >= 0.9
        assert a["mask_score"] == pytest.approx(b["mask_score"], abs=0.05)


@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory):
    from sculpt.testing import tiny_florence2

    return tiny_florence2.write(str(tmp_path_factory.mktemp("florence2") / "florence2"))


@pytest.mark.parametrize("dtype", REDUCED)
def test_grounder_in_reduced_precision(florence_dir, dtype):
    stages = {d: Grounder(model=florence_dir, dtype=d, num_beams=1, max_new_tokens=64) for d in ("float32", dtype)}
    for stage in stages.values():
        stage.setup()
    assert next(stages[dtype].model.parameters()).dtype == getattr(torch, dtype)
    # The same teacher-forced step in both precisions: the decoder's logits agree within the stated tolerance.
    caption = "A gray cat sits on a red sofa."
    image = samples.photo("chelsea")
    logits = {}
    for d, stage in stages.items():
        inputs = stage.processor(text=["<CAPTION_TO_PHRASE_GROUNDING>" + caption], images=[image],
                                 return_tensors="pt").to(stage.device, stage.dtype)
        with torch.inference_mode():
            logits[d] = stage.model(**inputs, decoder_input_ids=inputs["input_ids"][:, :8]).logits.float()
    full = logits["float32"]
    assert (logits[dtype] - full).abs().max() <= 0.05 * (full.max() - full.min())
    # And the whole stage, on the caption the tiny model was trained to ground, finds the same boxes.
    from sculpt.testing import kit

    found = {d: StageActor(stage)(schema.to_table([row("chelsea", 0, caption=kit.CAPTION),
                                                   row("rocket", 1, caption=kit.CAPTION)])).to_pylist()
             for d, stage in stages.items()}
    assert [r["status"] for r in found[dtype]] == ["ok", "ok"]
    assert all(len(r["objects"]) >= 4 for r in found[dtype])
    for a, b in zip(found[dtype], found["float32"]):
        assert [o["phrase"] for o in a["objects"]] == [o["phrase"] for o in b["objects"]]
        assert [o["box"] for o in a["objects"]] == [o["box"] for o in b["objects"]]


@pytest.fixture(scope="module")
def sam3_dir(tmp_path_factory):
    from sculpt.testing import tiny_sam3

    return tiny_sam3.write(str(tmp_path_factory.mktemp("sam3") / "sam3"))


@pytest.mark.parametrize("dtype", REDUCED)
def test_instance_finder_in_reduced_precision(sam3_dir, dtype):
    """SAM 3 (the instances stage), weights in the dtype as transformers loads them (as Florence-2's): the same
    instances, counts and groups as in float32, the found plant's box and mask within the tolerances above."""
    from actors.instances import InstanceFinder
    from sculpt.annotation import instances
    from tests.test_instances import kit_row

    stages = {d: InstanceFinder(model=sam3_dir, dtype=d) for d in ("float32", dtype)}
    out = {d: StageActor(stage)(schema.to_table([kit_row("chelsea")])).to_pylist()[0] for d, stage in stages.items()}
    assert next(stages[dtype].model.parameters()).dtype == getattr(torch, dtype)
    assert out[dtype]["status"] == out["float32"]["status"] == "ok", out[dtype]["error"]
    reduced, full = out[dtype]["objects"], out["float32"]["objects"]
    assert len(reduced) == len(full) == len(kit_row()["objects"]) + 1  # one plant the caption missed, found
    for a, b in zip(reduced, full):
        assert (a["phrase"], a["instances"], a["members"]) == (b["phrase"], b["instances"], b["members"])
        if a["phrase_start"] is None:
            assert instances.box_iou(a["box"], b["box"]) >= 0.9
            assert iou(rle.decode(a["mask"]), rle.decode(b["mask"])) >= 0.9
            assert a["mask_score"] == pytest.approx(b["mask_score"], abs=0.05)
