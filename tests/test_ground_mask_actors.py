"""Grounder (Florence-2) and Masker (SAM2) on tiny random-weight checkpoints in their real formats, without Ray.

Random weights generate arbitrary text, so the grounder's model output is scripted where content matters: the
tokens go through the real tokenizer, batch decoding and the processor's own post-processing.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sam2")

from actors.ground import Grounder  # noqa: E402
from actors.mask import Masker, build_sam2_model  # noqa: E402
from sculpt.annotation import grounding, rle  # noqa: E402
from sculpt.testing import samples
from sculpt import schema
from sculpt.testing import tiny_florence2, tiny_sam2  # noqa: E402
from sculpt.stage import StageActor  # noqa: E402

TASK = grounding.TASK


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("checkpoints")
    # untrained: these tests script the model output where content matters
    return {"florence2": tiny_florence2.write(str(root / "florence2"), train=False), "sam2": tiny_sam2.write(str(root / "sam2"))}


@pytest.fixture(scope="module")
def grounder(checkpoints):
    stage = Grounder(model=checkpoints["florence2"], num_beams=1, max_new_tokens=16)
    return StageActor(stage)


@pytest.fixture(scope="module")
def masker(checkpoints):
    return StageActor(Masker(model=checkpoints["sam2"], masks_at_once=2))


def row_for(name, index=0, caption=None, image=None):
    image = samples.photo(name) if image is None else image
    return schema.new_row("u", index, f"sa_{index}", image_bytes=samples.jpeg_bytes(image, quality=95),
                          width=image.shape[1], height=image.shape[0], caption=caption)


# -- Florence-2 post-processing: golden strings ---------------------------------------------------------------

GOLDEN = "</s><s>a cat<loc_0><loc_0><loc_999><loc_999>a dog<loc_100><loc_250><loc_500><loc_750></s><pad>"


@pytest.mark.parametrize(
    "size, cat, dog",
    [
        # landscape 2250 x 1500: x = int((k + 0.5) * 2.25), y = int((k + 0.5) * 1.5)
        ((2250, 1500), [1, 0, 2248, 1499], [226, 375, 1126, 1125]),
        # portrait 1500 x 2250: the axes swap their scales
        ((1500, 2250), [0, 1, 1499, 2248], [150, 563, 750, 1688]),
    ],
)
def test_processor_turns_loc_bins_into_truncated_bin_centres(checkpoints, size, cat, dog):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoints["florence2"])
    parsed = processor.post_process_generation(GOLDEN, task=TASK, image_size=size)[TASK]
    assert parsed == {"bboxes": [cat, dog], "labels": ["a cat", "a dog"]}
    # What the processor does: pixel = (k + 0.5) * size / 1000, truncated to an integer (so < 1 px off the centre).
    width, height = size
    centre = [(k + 0.5) * s / 1000 for k, s in zip([100, 250, 500, 750], [width, height, width, height])]
    assert all(0 <= c - d < 1 for c, d in zip(centre, dog))


def test_tiny_florence2_is_in_the_native_format(checkpoints):
    import os

    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    directory = checkpoints["florence2"]
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= set(os.listdir(directory))
    model = Florence2ForConditionalGeneration.from_pretrained(directory)
    tokenizer = AutoProcessor.from_pretrained(directory).tokenizer
    assert tokenizer.tokenize("a<loc_0><loc_999><poly>") == ["a", "<loc_0>", "<loc_999>", "<poly>"]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert model.config.image_token_id == tokenizer.image_token_id
    assert model.config.text_config.vocab_size == len(tokenizer)


# -- Grounder -------------------------------------------------------------------------------------------------

LONG_CAPTION = (
    "A gray tabby cat with green eyes lies on a wooden table next to a white coffee cup and a silver spoon. "
    "Behind it, the image shows a bright window with green trees, a blue sky and two white clouds above a red roof. "
    "The cat looks at the camera while its long tail hangs over the edge of the table near a small plant."
)
# phrase -> bins its scripted generation grounds it to (a repeated phrase grounds to several boxes)
SCRIPT = {
    "gray tabby cat": [[100, 200, 600, 900]],
    "white coffee cup": [[700, 300, 800, 500], [700, 300, 800, 501]],  # a near-duplicate box: dropped
    "it": [[0, 0, 999, 999]],  # a pronoun: dropped
    "the image": [[0, 0, 999, 999]],
    "blue sky": [[0, 0, 999, 300]],
    "two white clouds": [[400, 50, 400, 90]],  # zero width: dropped
    "small plant": [[850, 600, 950, 990], [10, 600, 90, 990]],
}


def scripted_generate(processor, seen):
    """Stands in for model.generate: grounds the SCRIPT phrases found in each prompt, in caption order."""
    tokenizer = processor.tokenizer

    def generate(input_ids, attention_mask, mm_encoder_outputs, **kwargs):
        assert len(mm_encoder_outputs["image"].pooler_output) == len(input_ids)  # one image encoding per prompt
        outputs = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            chunk = prompt.split("Locate the phrases in the caption:", 1)[1]
            seen.append((chunk, int(mask.sum())))
            words = " " + " ".join(chunk.replace(",", " ").replace(".", " ").split()) + " "
            hits = sorted((chunk.find(p), p) for p in SCRIPT if f" {p} " in words)
            text = "".join(p + "".join(f"<loc_{k}>" for box in SCRIPT[p] for k in box) for _, p in hits)
            outputs.append(tokenizer("</s><s>" + text + "</s>", add_special_tokens=False)["input_ids"])
        longest = max(map(len, outputs))
        return torch.tensor([o + [tokenizer.pad_token_id] * (longest - len(o)) for o in outputs])

    return generate


def expected_box(bins, width, height):
    return [float(int((k + 0.5) * s / 1000)) for k, s in zip(bins, [width, height, width, height])]


def test_grounder_splits_long_captions_and_maps_phrases_back(grounder, monkeypatch):
    stage = grounder.stage
    assert stage.count_tokens(LONG_CAPTION) > stage.budget  # the caption does not fit the tiny encoder at once
    seen = []
    monkeypatch.setattr(stage.model, "generate", scripted_generate(stage.processor, seen))
    rows = [row_for("chelsea", 0, LONG_CAPTION), row_for("rocket", 1, LONG_CAPTION), row_for("coffee", 2, "")]
    out = grounder(schema.to_table(rows)).to_pylist()

    assert len(seen) >= 2 * 2  # each caption went in as two chunks or more
    positions = stage.model.config.text_config.max_position_embeddings
    for chunk, length in seen:  # the budget counts exactly what the encoder reads, which fits its positions
        assert length == stage.processor.num_image_tokens + stage.count_tokens(chunk) <= positions
    for row in out[:2]:
        width, height = row["width"], row["height"]
        assert row["status"] == "ok", row["error"]
        objects = row["objects"]
        assert [o["phrase"] for o in objects] == ["gray tabby cat", "white coffee cup", "blue sky", "small plant", "small plant"]
        assert [o["box"] for o in objects] == [
            expected_box(SCRIPT["gray tabby cat"][0], width, height),
            expected_box(SCRIPT["white coffee cup"][0], width, height),
            expected_box(SCRIPT["blue sky"][0], width, height),
            expected_box(SCRIPT["small plant"][0], width, height),
            expected_box(SCRIPT["small plant"][1], width, height),
        ]
        for obj in objects:
            assert LONG_CAPTION[obj["phrase_start"]:obj["phrase_end"]] == obj["phrase"]
            assert obj["mask"] is None and obj["error"] is None
    assert out[2]["status"] == "ok" and out[2]["objects"] == []  # the writer marks it empty at commit


def test_grounder_runs_the_real_model_and_records_bad_images(grounder):
    good = row_for("rocket", 0, "A white rocket on a launch pad under a blue sky.")
    bad = schema.new_row("u", 1, "sa_1", image_bytes=b"not an image", width=10, height=10, caption="A cat.")
    out = grounder(schema.to_table([good, bad])).to_pylist()
    assert out[0]["status"] in ("ok", "empty") and out[0]["error"] is None
    for obj in out[0]["objects"]:  # whatever random weights say, what survives is well formed
        x0, y0, x1, y1 = obj["box"]
        assert 0 <= x0 < x1 <= out[0]["width"] and 0 <= y0 < y1 <= out[0]["height"]
        assert out[0]["caption"][obj["phrase_start"]:obj["phrase_end"]] == obj["phrase"]
    assert out[1]["status"] == "error" and out[1]["error"].startswith("ground: ImageError")


def test_grounder_encodes_each_image_once_for_all_its_chunks(tiny_models):
    """Two images, a caption chunk per sentence each (three): the vision tower runs once, on both images, and
    every chunk's generation (3 beams, the trained tiny model) equals the processor's own path, which encodes per
    prompt."""
    from sculpt.annotation import images
    from sculpt.testing import kit

    sentences = [kit.CAPTION[s:e] for s, e in grounding.sentence_spans(kit.CAPTION)]
    probe = Grounder(model=tiny_models["ground"])
    probe.setup()
    budget = max(map(probe.count_tokens, sentences))
    assert probe.count_tokens(kit.CAPTION) > budget  # the caption goes in as several chunks

    stage = Grounder(model=tiny_models["ground"], max_caption_tokens=budget)
    stage.setup()
    rows = [row_for("chelsea", 0, kit.CAPTION), row_for("rocket", 1, kit.CAPTION)]
    group = [(row, torch.from_numpy(images.load_rgb(row["image_bytes"])),
              grounding.split_caption(kit.CAPTION, stage.budget, stage.count_tokens)) for row in rows]
    assert len(sentences) == 3 and [len(chunks) for _, _, chunks in group] == [3, 3]  # a chunk per sentence
    encoded = []
    hook = stage.model.model.vision_tower.register_forward_hook(lambda module, args, out: encoded.append(len(args[0])))
    try:
        results = stage._generate(group)
    finally:
        hook.remove()
    assert encoded == [2]  # one pass of the vision tower over the two images, not one per chunk

    assert len(results) == 6 and sum(len(parsed["labels"]) for _, _, parsed in results) > 0
    for (row, image, _), chunk, parsed in results:
        inputs = stage.processor(text=[TASK + chunk.text], images=[image.numpy()], input_data_format="channels_last",
                                 return_tensors="pt")
        with torch.inference_mode():
            reference = stage.model.generate(**inputs, max_new_tokens=1024, num_beams=3, do_sample=False)
        text = stage.processor.batch_decode(reference, skip_special_tokens=False)[0]
        size = (image.shape[1], image.shape[0])
        assert parsed == stage.processor.post_process_generation(text, task=TASK, image_size=size)[TASK]


# -- Masker ---------------------------------------------------------------------------------------------------


def with_boxes(row, boxes):
    row["objects"] = [{"phrase": f"thing {i}", "box": [float(v) for v in box]} for i, box in enumerate(boxes)]
    return row


def test_masker_one_exact_rle_per_box_at_image_size(masker):
    rows = [with_boxes(row_for("chelsea", 0), [[10, 20, 200, 250], [150, 40, 451, 300], [0, 0, 451, 300]]),
            with_boxes(row_for("rocket", 1), [[50, 100, 300, 600]])]
    out = masker(schema.to_table(rows)).to_pylist()
    for row in out:
        assert row["status"] == "ok", row["error"]
        for obj in row["objects"]:
            mask = rle.decode(obj["mask"])
            assert mask.shape == (row["height"], row["width"])
            assert rle.encode(mask) == obj["mask"]  # exact round trip
            assert obj["area"] == int(mask.sum())
            assert 0.0 <= obj["mask_score"] <= 1.0 and obj["error"] is None
    assert [len(r["objects"]) for r in out] == [3, 1]


def test_masker_prompts_sam2_in_the_images_own_pixel_frame(masker, monkeypatch):
    """SAM2 normalises box corners by the image's width (x) and height (y): on a 451 x 300 image, a swap shows."""
    stage = masker.stage
    encoder = stage.model.sam_prompt_encoder
    received = []
    forward = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda points, boxes, masks: received.append(points[0].clone()) or forward(points, boxes, masks))
    boxes = np.array([[10, 20, 200, 250], [150, 40, 451, 300]], dtype=np.float32)
    stage.predict(samples.photo("chelsea"), boxes)
    (corners,) = received  # one batched prompt for all boxes of the image
    scale = np.array([1024 / 451, 1024 / 300], dtype=np.float32)
    np.testing.assert_allclose(corners.numpy(), boxes.reshape(-1, 2, 2) * scale, rtol=1e-5)


def test_early_rle_gives_the_predictors_own_masks(masker, checkpoints):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    image = samples.photo("rocket")
    boxes = np.array([[50, 100, 300, 600], [0, 0, 427, 640], [200, 300, 260, 330]], dtype=np.float32)
    rles, scores = masker.stage.predict(image, boxes)
    reference = SAM2ImagePredictor(masker.stage.model)  # the stock predictor, full-resolution masks
    reference.set_image(image)
    masks, ious, _ = reference.predict(box=boxes, multimask_output=False)
    ours, theirs = np.stack([rle.decode(r) for r in rles]), masks[:, 0].astype(bool)
    assert ours.shape == theirs.shape and theirs.any()
    # The image is squashed to SAM2's input on the device and rounded to uint8 there (sam2 resizes floats): the
    # masks may differ only in a few edge pixels.
    assert (ours != theirs).mean() < 1e-3
    np.testing.assert_allclose(scores, ious[:, 0], rtol=1e-3)


def test_masker_decodes_as_the_stock_predictor_does(masker):
    """On an image already at SAM2's input size (nothing to squash) the masker's masks and scores are the stock
    predictor's, bit for bit: the prompt encoder and mask decoder are called as SAM2ImagePredictor calls them,
    and the embedding is the one it computes (sculpt.models.sam2_features). A sam2 release that changes how
    the predictor prompts, embeds or upsamples fails here."""
    import cv2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    side = masker.stage.model.image_size
    image = cv2.resize(samples.photo("coffee"), (side, side), interpolation=cv2.INTER_AREA)
    boxes = np.array([[50, 100, 300, 600], [0, 0, side, side], [200, 300, 260, 330]], dtype=np.float32)
    rles, scores = masker.stage.predict(image, boxes)
    reference = SAM2ImagePredictor(masker.stage.model)
    reference.set_image(image)
    masks, ious, _ = reference.predict(box=boxes, multimask_output=False)
    np.testing.assert_array_equal(np.stack([rle.decode(r) for r in rles]), masks[:, 0].astype(bool))
    np.testing.assert_array_equal(scores, ious[:, 0])
    one, score = masker.stage.predict(image, boxes[1:2])  # a single box: the predictor drops its box axis
    masks, ious, _ = reference.predict(box=boxes[1], multimask_output=False)
    np.testing.assert_array_equal(rle.decode(one[0]), masks[0].astype(bool))
    np.testing.assert_array_equal(score, ious)


def test_masker_records_bad_boxes_and_bad_images(masker):
    row = with_boxes(row_for("coffee", 0), [[10, 10, 100, 100], [50, 50, 40, 60], [700, 10, 900, 50], [float("nan"), 0, 5, 5]])
    no_boxes = row_for("astronaut", 1)
    bad = with_boxes(schema.new_row("u", 2, "sa_2", image_bytes=b"junk", width=9, height=9), [[1, 1, 5, 5]])
    out = masker(schema.to_table([row, no_boxes, bad])).to_pylist()
    objects = out[0]["objects"]
    assert objects[0]["mask"] is not None and objects[0]["error"] is None
    assert "is empty" in objects[1]["error"] and "outside the 600x400 image" in objects[2]["error"]
    assert "not finite" in objects[3]["error"]
    assert all(o["mask"] is None for o in objects[1:])
    assert out[1]["status"] == "ok" and out[1]["objects"] == []
    assert out[2]["status"] == "error" and out[2]["error"].startswith("mask: ImageError")


def test_tiny_sam2_loads_with_build_sam2_and_leaves_sam2_configs_usable(checkpoints):
    import os

    from sam2.build_sam import build_sam2

    model = build_sam2_model(checkpoints["sam2"], "cpu")
    state = torch.load(os.path.join(checkpoints["sam2"], tiny_sam2.NAME + ".pt"), weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert os.path.getsize(os.path.join(checkpoints["sam2"], tiny_sam2.NAME + ".pt")) < 4 << 20
    build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu")  # sam2's own config names still resolve


def test_sam2_loader_names_what_it_cannot_use(tmp_path):
    with pytest.raises(ValueError, match="neither a directory nor a model id known to sam2"):
        build_sam2_model("facebook/sam3-huge", "cpu")
    (tmp_path / "a.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="not an official sam2 checkpoint name"):
        build_sam2_model(str(tmp_path), "cpu")
    (tmp_path / "b.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"expected one \*.pt"):
        build_sam2_model(str(tmp_path), "cpu")


def test_masker_embeds_a_batch_of_images_at_once_with_the_same_masks(checkpoints, monkeypatch):
    from sam2.modeling.sam2_base import SAM2Base

    batches = []
    real = SAM2Base.forward_image
    monkeypatch.setattr(SAM2Base, "forward_image", lambda self, images: batches.append(len(images)) or real(self, images))

    def run(images_at_once):
        rows = [with_boxes(row_for("chelsea", 0), [[10, 20, 200, 250], [150, 40, 451, 300]]),
                with_boxes(row_for("rocket", 1), [[50, 100, 300, 600]]),
                with_boxes(row_for("coffee", 2), [[0, 0, 300, 200], [100, 100, 500, 390], [10, 10, 40, 40]])]
        return StageActor(Masker(model=checkpoints["sam2"], images_at_once=images_at_once))(schema.to_table(rows)).to_pylist()

    together, alone = run(3), run(1)
    assert batches == [3, 1, 1, 1]  # one embedding batch of three images, then three of one
    assert [len(r["objects"]) for r in together] == [2, 1, 3]
    for a, b in zip(together, alone):
        for x, y in zip(a["objects"], b["objects"]):
            m, n = rle.decode(x["mask"]), rle.decode(y["mask"])
            assert (m & n).sum() >= 0.99 * max((m | n).sum(), 1) and x["mask_score"] == pytest.approx(y["mask_score"], abs=1e-3)


# -- a batch that fails part-way is tried again from the rows as they came --------------------------------------

def fail_once_on_call(function, call: int, seen: list):
    """``function``, raising a CUDA-style out-of-memory error the ``call``-th time it is called (and only then)."""

    def wrapped(*args, **kwargs):
        seen.append(1)
        if len(seen) == call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return function(*args, **kwargs)

    return wrapped


def test_grounder_retry_after_a_fault_part_way_adds_each_object_once(grounder, monkeypatch):
    stage = grounder.stage
    monkeypatch.setattr(stage.model, "generate", scripted_generate(stage.processor, []))
    monkeypatch.setitem(stage.params, "prompts_per_call", 1)  # each image its own group of model calls
    monkeypatch.setattr(grounder, "backoff", 0.0)
    calls = []  # the first image's objects are in its row when the second image's group fails
    monkeypatch.setattr(stage, "_generate", fail_once_on_call(stage._generate, 2, calls))
    rows = [row_for("chelsea", 0, LONG_CAPTION), row_for("rocket", 1, LONG_CAPTION)]
    out = grounder(schema.to_table(rows)).to_pylist()
    assert len(calls) == 4  # two groups, the second failed, then both again
    for row in out:
        assert row["status"] == "ok", row["error"]
        assert [o["phrase"] for o in row["objects"]] == ["gray tabby cat", "white coffee cup", "blue sky", "small plant",
                                                         "small plant"]
        assert [span["objects"] for span in row["grounded_caption"]] == [[0], [1], [2], [3, 4]]


def test_masker_retry_after_a_fault_part_way_still_groups_every_image(masker, monkeypatch):
    stage = masker.stage
    monkeypatch.setitem(stage.params, "images_at_once", 1)
    monkeypatch.setattr(masker, "backoff", 0.0)
    calls = []  # the first image's boxes all have masks when the second image's call fails
    monkeypatch.setattr(stage, "predict_images", fail_once_on_call(stage.predict_images, 2, calls))
    rows = []
    for index, name in enumerate(["chelsea", "rocket"]):  # one phrase grounded to two boxes: a group to build
        row = row_for(name, index, caption="two things")
        row["objects"] = [{"phrase": "two things", "phrase_start": 0, "phrase_end": 10, "box": box}
                          for box in ([10.0, 20.0, 100.0, 150.0], [120.0, 40.0, 250.0, 200.0])]
        rows.append(row)
    out = masker(schema.to_table(rows)).to_pylist()
    assert len(calls) == 4
    for row in out:
        assert row["status"] == "ok", row["error"]
        assert [o["members"] for o in row["objects"]] == [None, None, [0, 1]]  # two masks and their group, once
        assert all(o["mask"] for o in row["objects"])
