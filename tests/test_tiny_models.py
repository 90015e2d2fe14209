"""The trained tiny checkpoints act out the kit's scene through the real model code, so objects reach every stage.

Florence-2 runs through the ground stage (transformers, beam search, the processor's post-processing) in float32
and bfloat16; InternVL through transformers' generate in float32 and bfloat16 (through real vLLM, the CPU build, with dynamic
tiling: tests/test_vlm.py, on its engine).
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


def test_writing_the_kit_prints_no_progress_of_its_own(kit_writer_output):
    """The demo writes the kit on a fresh machine: its output is sculpt's lines, not a bar per checkpoint (nor the
    blank lines of one that is not on a terminal, nor the BPE trainer's own, which Rust writes itself). The suite's
    kit is written by `sculpt models tiny` (tests/conftest.py): this is all it printed, stdout and stderr."""
    from sculpt.testing.kit import WRITERS

    lines = kit_writer_output.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == list(WRITERS), lines
    assert lines[-1].startswith("use them with: --config ") and len(lines) == len(WRITERS) + 1, lines
