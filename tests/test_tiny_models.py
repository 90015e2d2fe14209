"""The trained tiny checkpoints act out the kit's scene through the real model code, so objects reach every stage.

Florence-2 runs through the ground stage (transformers, beam search, the processor's post-processing) in float32
and bfloat16; InternVL through transformers' generate in float32 and bfloat16, and through real vLLM (the CPU
build) with dynamic tiling.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from actors.ground import Grounder  # noqa: E402
from sculpt import config, schema  # noqa: E402
from sculpt.annotation import grounding, prompts
from sculpt.testing import samples
from sculpt.testing.kit import CAPTION, EXPRESSION, GROUNDING, GROUP_EXPRESSION, LISTENER_ANSWER, NEGATIVE  # noqa: E402

# The caption's own text at each grounded span, a phrase repeated once per box of its group.
PHRASES = ["A gray cat", "a red sofa", "the wooden floor", "Its long tail", "Two green plants", "Two green plants",
           "the window"]
BINS = [box for boxes in GROUNDING.values() for box in boxes]


def photo_row(index, name, caption=CAPTION):
    image = samples.photo(name)
    return schema.new_row("u", index, f"sa_{index}", image_bytes=samples.jpeg_bytes(image), width=image.shape[1],
                          height=image.shape[0], caption=caption)


def pixel_box(bins, width, height):
    """Florence-2's processor: a bin's centre, (k + 0.5) / 1000 of the side, truncated to a pixel."""
    return [float(int((k + 0.5) * side / 1000)) for k, side in zip(bins, (width, height, width, height))]


def scene_prompts(width, height):
    """(prompt, the trained answer, how the stage cleans it) for the caption, refer, group, negative and listener
    prompts, as the caption, refer and listen stages ask them about the kit's scene."""
    members = [pixel_box(b, width, height) for b in GROUNDING["two green plants"]]
    return [
        (prompts.CAPTION_PROMPT, CAPTION, prompts.clean_caption),
        (prompts.refer_prompt(CAPTION, "a gray cat", pixel_box(GROUNDING["a gray cat"][0], width, height), width, height),
         EXPRESSION, prompts.clean_expression),
        (prompts.refer_prompt(CAPTION, "Two green plants", members[0], width, height, member_boxes=members),
         GROUP_EXPRESSION, prompts.clean_expression),
        (prompts.negative_prompt(CAPTION, PHRASES, 1), NEGATIVE, lambda text: prompts.clean_negatives(text, 1, PHRASES)[0]),
        (prompts.listener_prompt(GROUP_EXPRESSION), LISTENER_ANSWER, lambda text: text),
    ]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_florence2_grounds_the_scene_caption_on_every_photo(tiny_models, dtype):
    whole = Grounder(model=tiny_models["ground"], dtype=dtype)  # the stage's defaults: beam search, 3 beams
    whole.setup()
    # A budget below the caption's length makes the stage ground it sentence by sentence.
    sentences = Grounder(model=tiny_models["ground"], dtype=dtype, num_beams=1,
                         max_caption_tokens=max(whole.count_tokens(CAPTION[a:b]) for a, b in grounding.sentence_spans(CAPTION)))
    sentences.setup()
    assert sentences.count_tokens(CAPTION) > sentences.budget
    for stage in (whole, sentences):
        rows = [photo_row(i, name) for i, name in enumerate(samples.PHOTOS)]
        stage.process(rows)
        for row in rows:
            assert row["status"] == "ok" and row["error"] is None, row["error"]
            objects = row["objects"]
            assert [o["phrase"] for o in objects] == PHRASES, (stage.params, row["image_key"], objects)
            assert [o["box"] for o in objects] == [pixel_box(b, row["width"], row["height"]) for b in BINS]
            for obj in objects:
                assert CAPTION[obj["phrase_start"]:obj["phrase_end"]] == obj["phrase"]
                x0, y0, x1, y1 = obj["box"]
                assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_internvl_answers_the_scene_prompts_under_transformers_generate(tiny_models, dtype):
    from PIL import Image
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_models["vlm"])
    model = InternVLForConditionalGeneration.from_pretrained(tiny_models["vlm"], dtype=getattr(torch, dtype)).eval()
    for name in ("astronaut", "coffee"):  # one tile; two tiles and a thumbnail
        image = Image.fromarray(samples.photo(name))
        for text, expected, clean in scene_prompts(*image.size):
            turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
            chat = processor.apply_chat_template([turn], add_generation_prompt=True)
            inputs = processor(images=[image], text=[chat], return_tensors="pt").to(model.dtype)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=48, do_sample=False)
            new = out[0, inputs["input_ids"].shape[1]:]
            assert new[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), (name, text[:40])
            answer = processor.decode(new, skip_special_tokens=True)
            assert answer == expected and clean(answer) == expected, (name, text[:40], answer)


def test_tiny_internvl_captions_refers_and_negates_under_vllm(tiny_models):
    pytest.importorskip("vllm")
    import json
    import os

    from safetensors import safe_open

    from actors.vlm import VLMEngine

    directory = tiny_models["vlm"]
    # Stored in the dtype vLLM's "auto" picks from the config, so the engine loads the weights without a cast.
    with open(os.path.join(directory, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}

    engine = VLMEngine(directory, {"max_model_len": 4096, "enforce_eager": True, "seed": 0}, max_tiles=2, min_tiles=1)
    try:
        photos = {name: samples.jpeg_bytes(samples.photo(name)) for name in samples.PHOTOS}
        sizes = {name: samples.photo(name).shape[1::-1] for name in samples.PHOTOS}
        requests = [(name, prompts.CAPTION_PROMPT) for name in photos]
        for (name, (width, height)), phrase in zip(sizes.items(), list(GROUNDING) * 2):
            requests.append((name, prompts.refer_prompt(CAPTION, phrase, (width * 0.1, height * 0.2, width * 0.6,
                                                                             height * 0.9), width, height)))
        requests.append(("chelsea", prompts.refer_prompt("A cat.", "the cat", (0, 0, 200, 150), 451, 300)))
        # the group and negative prompts as the refer stage asks them, in the 24 tokens it gives one negative
        scene = [(name, text, expected, clean)
                 for name, size in sizes.items() for text, expected, clean in scene_prompts(*size)[2:]]
        more = engine.chat(photos, [(name, text) for name, text, _, _ in scene], max_tokens=24)
        answers = engine.chat(photos, requests, max_tokens=48)
    finally:
        engine.shutdown()

    for (name, text, expected, clean), answer in zip(scene, more):
        assert answer["finish_reason"] == "stop", (name, text[:40], answer)
        assert answer["text"] == clean(answer["text"]) == expected, (name, text[:40], answer)
    captions, expressions = answers[:len(photos)], answers[len(photos):]
    for answer in captions:
        assert answer["finish_reason"] == "stop" and prompts.clean_caption(answer["text"]) == CAPTION, answer
    # coffee (3:2) and chelsea (3:2) take two tiles and a thumbnail; the square photos one tile
    assert captions[1]["prompt_tokens"] - captions[0]["prompt_tokens"] == 2 * 256
    for answer in expressions:
        assert answer["finish_reason"] == "stop", answer
        expression = prompts.clean_expression(answer["text"])
        assert expression == EXPRESSION and len(expression.split()) >= prompts.MIN_EXPRESSION_WORDS


def test_a_kit_knows_the_code_that_wrote_it(tiny_models, tmp_path):
    import os

    import yaml

    from sculpt.testing.kit import kit_version, written_version

    kit_dir = os.path.dirname(tiny_models["vlm"])
    assert written_version(kit_dir) == kit_version()  # the demo reuses this kit
    assert written_version(str(tmp_path)) is None  # no kit: the demo writes one
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": tiny_models}))  # a kit from before versions
    assert written_version(str(tmp_path)) is None  # stale: rewritten
    # what `sculpt models tiny DIR` says to do with it: the kit's models.yaml is a config file
    assert config.load(os.path.join(kit_dir, "models.yaml")).models.vlm == tiny_models["vlm"]


def test_writing_the_kit_prints_no_progress_of_its_own(tiny_models, capfd):
    """The demo writes the kit on a fresh machine: its output is sculpt's lines, not a bar per checkpoint."""
    from transformers.utils import logging as transformers_logging

    from sculpt.testing import tiny_florence2

    assert not transformers_logging.is_progress_bar_enabled()  # save_pretrained's "Writing model shards" bar
    capfd.readouterr()
    tiny_florence2._tokenizer()  # trains a BPE tokenizer (Rust, writes to the terminal itself)
    printed = capfd.readouterr()
    assert printed.out == printed.err == "", printed  # even the blank lines of a bar that is not on a terminal
