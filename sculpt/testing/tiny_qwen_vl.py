"""Seeded, tiny, random-weight Qwen2.5-VL, Qwen3-VL and Qwen2-VL checkpoints in their Hugging Face formats.

The files a real checkpoint has (config.json of transformers' own config class, model.safetensors, a Qwen2
tokenizer with the family's special tokens, the family's processor and chat template), so vLLM and transformers
load them through their real code, as ``tiny_internvl``'s. Briefly trained (seeded, one CPU thread) to act out the
kit's scene as the tiny InternVL does, in the family's own box convention (``sculpt.annotation.profiles``): the
caption prompt gives ``kit.CAPTION``, any refer prompt ``kit.EXPRESSION``, any group refer prompt
``kit.GROUP_EXPRESSION``, any negative prompt ``kit.NEGATIVE``, and any listener prompt the cat's box
(``kit.LISTENER_BOX``) in the family's answer form: ``listener_answer`` (Qwen2-VL's ``<|box_start|>`` tokens are
special: vLLM leaves them out of the answer's text, and the profile reads the ``(x0,y0),(x1,y1)`` left).

Not part of the default kit (``kit.WRITERS``): tests that serve another family write these with ``write``.
Images are resized by the processor to at most ``MAX_TOKENS`` merged patches (a few dozen image tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

from sculpt.testing import tiny_internvl

MAX_TOKENS = 64  # merged patches (image tokens) per image at most: the processor's max_pixels
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# The family's chat template, reduced to one conversation's needs: an image part becomes its vision placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FAMILIES = {  # profile name -> patch size of the family's vision tower (merged 2x2)
    "qwen2_vl": 14,
    "qwen2_5_vl": 14,
    "qwen3_vl": 16,
}
# The size of the images tests/test_vlm_profiles_served.py runs the chain on: Qwen2.5-VL answers in pixels of its
# resized input, so its trained listener answer is the cat's box in the resized input of an image of this size.
ANSWER_IMAGE_SIZE = (600, 400)


def pixel_bounds(family: str) -> tuple[int, int, int]:
    """(factor, min_pixels, max_pixels) of the family's tiny processor."""
    factor = FAMILIES[family] * 2
    return factor, factor * factor * 4, factor * factor * MAX_TOKENS


def input_size(family: str, width: int, height: int) -> tuple[int, int]:
    """The tiny processor's resized input size, by transformers' own rule (smart_resize)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    factor, least, most = pixel_bounds(family)
    resized_height, resized_width = smart_resize(height, width, factor=factor, min_pixels=least, max_pixels=most)
    return resized_width, resized_height


def listener_answer(family: str) -> str:
    """The trained listener answer: the cat's box (kit.LISTENER_BOX, 0..1000) in the family's answer form, for an
    image of ``ANSWER_IMAGE_SIZE``."""
    from sculpt.annotation import profiles
    from sculpt.testing.kit import LISTENER_BOX

    width, height = ANSWER_IMAGE_SIZE
    box = [v / 1000 * side for v, side in zip(LISTENER_BOX, (width, height, width, height))]
    profile = profiles.PROFILES[family]
    size = None if profile.relative else input_size(family, width, height)
    if profile.style == "points":  # Qwen2-VL: <|box_start|>(x0,y0),(x1,y1)<|box_end|>
        return profile.box_to_text(box, width, height)
    return json.dumps({"bbox_2d": profile.coordinates(box, width, height, size)})


def _tokenizer(family: str):
    from transformers import Qwen2Tokenizer

    from sculpt.annotation import profiles, prompts
    from sculpt.testing.kit import CAPTION
    from sculpt.testing.tiny_internvl import CORPUS, train_bpe

    profile = profiles.PROFILES[family]
    samples = [prompts.refer_prompt(CAPTION, "a gray cat", (10, 20, 300, 200), 600, 400, profile=profile,
                                    input_size=(252, 168)), profile.listener_prompt("the gray cat")]
    templates = [prompts.CAPTION_PROMPT, prompts.REFER_PROMPT, prompts.GROUP_REFER_PROMPT, prompts.NEGATIVE_PROMPT]
    vocab, merges = train_bpe(CORPUS + [CAPTION, listener_answer(family)] + templates + samples, 1024)
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _config(family: str, tokenizer):
    import torch

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                  patch_size=FAMILIES[family], spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}
        config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=64, hidden_size=64, mlp_ratio=2,
                                                                    num_heads=2, patch_size=14, spatial_merge_size=2,
                                                                    temporal_patch_size=2, in_channels=3),
                               tie_word_embeddings=False, **tokens)
        model_class = Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]}
        config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(vision, window_size=112, fullatt_block_indexes=[1]),
                                  tie_word_embeddings=False, **tokens)
        model_class = Qwen2_5_VLForConditionalGeneration
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                                   "mrope_interleaved": True}
        config = Qwen3VLConfig(text_config=text, vision_config=dict(vision, num_position_embeddings=256,
                                                                    deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh"),
                               tie_word_embeddings=False, **tokens)
        model_class = Qwen3VLForConditionalGeneration
    config.dtype = torch.float32
    return config, model_class


def _processor(family: str, tokenizer):
    from transformers import Qwen2VLImageProcessor

    factor, least, most = pixel_bounds(family)
    patch = FAMILIES[family]
    image_processor = Qwen2VLImageProcessor(min_pixels=least, max_pixels=most, patch_size=patch, merge_size=2,
                                            temporal_patch_size=2)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(min_pixels=least, max_pixels=most, patch_size=patch, merge_size=2)
        processor_class = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                                   chat_template=CHAT_TEMPLATE)
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    video = Qwen3VLVideoProcessor(size={"shortest_edge": least, "longest_edge": most}, patch_size=patch, merge_size=2)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                            chat_template=CHAT_TEMPLATE)


def write(directory: str, family: str = "qwen2_5_vl", seed: int = 0, train: bool = True) -> str:
    """Write the family's checkpoint into ``directory``; ``train=False`` leaves the weights random."""
    import torch
    from transformers import GenerationConfig

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(family)
    processor = _processor(family, tokenizer)
    processor.save_pretrained(out)
    config, model_class = _config(family, tokenizer)
    model = model_class(config).eval()
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    if train:
        from sculpt.testing.kit import one_thread

        with one_thread():
            train_scene(model, processor, family, seed)
    return tiny_internvl.save_in_bfloat16(model, out)


def _prompt_text(rng, task: str, family: str, width: int, height: int) -> str:
    """The tiny InternVL's training prompts, in this family's words and box convention."""
    from sculpt.annotation import profiles, prompts

    profile = profiles.PROFILES[family]
    size = None if profile.relative else input_size(family, width, height)
    if task == "listen":
        return profile.listener_prompt(tiny_internvl._listen_text(rng).split("<ref>")[1].split("</ref>")[0])
    if task == "caption":
        return prompts.CAPTION_PROMPT
    if task == "negative":
        return tiny_internvl._negative_text(rng)
    from sculpt.testing.kit import GROUNDING

    caption = tiny_internvl._caption(rng)
    phrase = rng.choice(list(GROUNDING) + ["the " + rng.choice(tiny_internvl._OTHER_WORDS)])
    if task == "group":
        members = [tiny_internvl._box(rng, width, height) for _ in range(rng.randint(2, 3))]
        return prompts.refer_prompt(caption, phrase, members[0], width, height, member_boxes=members,
                                    profile=profile, input_size=size)
    return prompts.refer_prompt(caption, phrase, tiny_internvl._box(rng, width, height), width, height,
                                profile=profile, input_size=size)


TRAIN_STEPS, TRAIN_LR, MIN_MARGIN = 160, 6e-3, 1.0


def _image(processor, picture):
    """The image processor's pixel values and grid of one picture (computed once per picture)."""
    out = processor.image_processor(images=[picture], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _prompt_ids(processor, text: str, grid) -> list[int]:
    """Token ids of one user turn about the picture: the processor's own expansion of its image placeholder into
    one <|image_pad|> per merged patch (checked against the processor in ``train_scene``)."""
    ids = processor.tokenizer(tiny_internvl.chat_prompt(processor, text), add_special_tokens=False)["input_ids"]
    at = ids.index(processor.image_token_id)
    return ids[:at] + [processor.image_token_id] * (int(grid.prod()) // 4) + ids[at + 1:]


def _batch(processor, image, prompts_answers, pad: int):
    """Model inputs of one picture (``_image``) asked several prompts, each followed by its answer (right-padded),
    and their labels."""
    import torch

    pixels, grid = image
    rows, labels = [], []
    for prompt, answer in prompts_answers:
        ids = _prompt_ids(processor, prompt, grid)
        rows.append(ids + answer)
        labels.append([-100] * len(ids) + answer)
    length = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
             "mm_token_type_ids": (ids == processor.image_token_id).long(),
             "pixel_values": pixels.repeat(len(rows), 1), "image_grid_thw": grid.repeat(len(rows), 1)}
    return batch, torch.tensor([r + [-100] * (length - len(r)) for r in labels])


def _margins(model, batch, labels):
    import torch

    logits = model(**batch).logits[:, :-1].float()
    targets = labels[:, 1:]
    logits, targets = logits[targets != -100], targets[targets != -100]
    right = logits.gather(1, targets[:, None])[:, 0]
    wrong = logits.scatter(1, targets[:, None], float("-inf")).max(1).values
    return torch.nn.functional.cross_entropy(logits, targets), right - wrong


def train_scene(model, processor, family: str, seed: int = 0, steps: int = TRAIN_STEPS) -> dict:
    """Teach the model the kit's scene in the family's convention (see the module); raises RuntimeError if the
    answers do not win every step by ``MIN_MARGIN`` in float32 and bfloat16 on images it never saw."""
    import random

    import numpy as np
    import torch
    from PIL import Image

    from sculpt.testing.kit import CAPTION, EXPRESSION, GROUP_EXPRESSION, NEGATIVE

    rng = random.Random(seed)
    tokenizer = processor.tokenizer
    pad, eos = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = {task: tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
               for task, text in (("caption", CAPTION), ("refer", EXPRESSION), ("group", GROUP_EXPRESSION),
                                  ("negative", NEGATIVE), ("listen", listener_answer(family)))}
    pictures = [(picture, _image(processor, picture)) for picture in tiny_internvl._pictures(seed)]
    picture, image = pictures[1]
    expected = processor(images=[picture], text=[tiny_internvl.chat_prompt(processor, "x")], return_tensors="pt")
    assert expected["input_ids"][0].tolist() == _prompt_ids(processor, "x", image[1]), "the processor expands differently"
    assert expected["mm_token_type_ids"][0].tolist() == [int(i == processor.image_token_id) for i in _prompt_ids(processor, "x", image[1])]
    for parameter in model.model.visual.parameters():
        parameter.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=TRAIN_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    model.train()
    for _ in range(steps):
        picture, image = pictures[rng.randrange(len(pictures))]
        batch, labels = _batch(processor, image, [(_prompt_text(rng, task, family, *picture.size), answer)
                                                    for task, answer in answers.items()], pad)
        loss = _margins(model, batch, labels)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)

    check = random.Random(seed + 1)
    noise = np.random.RandomState(seed + 1)
    held_out = [Image.fromarray((noise.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in ((300, 500), (700, 200))]
    worst = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            margins = {task: [] for task in answers}
            for picture in held_out:
                image = _image(processor, picture)
                for task, answer in answers.items():
                    batch, labels = _batch(processor, image, [(_prompt_text(check, task, family, *picture.size), answer)], pad)
                    batch["pixel_values"] = batch["pixel_values"].to(dtype)
                    margins[task].append(_margins(model, batch, labels)[1])
            name = str(dtype).removeprefix("torch.")
            worst[name] = {task: torch.cat(m).min().item() for task, m in margins.items()}
            task, margin = min(worst[name].items(), key=lambda item: item[1])
            if margin < MIN_MARGIN:
                raise RuntimeError(f"tiny {family}: the trained scene's {task} answer decodes with a logit margin of "
                                   f"{margin:.2f} < {MIN_MARGIN} in {name} on unseen images (training did not converge)")
    model.to(torch.float32)
    return worst
