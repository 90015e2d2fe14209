"""A tiny Florence-2 in transformers' native format (the layout of florence-community/Florence-2-*).

``write(directory)`` saves config + safetensors + processor (CLIP image processor, post-processor config) +
tokenizer, loadable by ``Florence2ForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``.
The tokenizer is a byte-level BPE trained here with the ``tokenizers`` library and handed to Florence-2's own
tokenizer class (BART's), with Florence-2's special tokens, ``<loc_0>``…``<loc_999>`` and ``<image>`` added.

The image is 64×64 pixels (2×2 vision tokens + 1 = 5 image tokens, the real model has 24×24 + 1 = 577) and the
text encoder has 160 positions, so a caption of a few sentences already needs splitting.

The weights are briefly trained (``train_scene``) to ground the kit's scene caption (``sculpt.testing.kit``) and
each run of its sentences, whatever the image; any other caption gets whatever the weights say.
"""

from __future__ import annotations

IMAGE_SIZE = 64  # the vision tower downsamples by 32: 2×2 spatial tokens
IMAGE_TOKENS = (IMAGE_SIZE // 32) ** 2 + 1  # + the one temporal token the projector appends
TEXT_POSITIONS = 160

# Added on top of BART's vocabulary by Florence-2's processor, in this order.
FLORENCE_TOKENS = (
    ["<od>", "</od>", "<ocr>", "</ocr>"]
    + [f"<loc_{k}>" for k in range(1000)]
    + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>", "<seg>", "</seg>"]
    + ["<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>", "</region_to_desciption>"]
    + ["<proposal>", "</proposal>", "<poly>", "</poly>", "<and>"]
)

POST_PROCESSOR_CONFIG = {
    "ocr": {
        "pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
        "area_threshold": 0.0,
    },
    "phrase_grounding": {"banned_grounding_tokens": ["the image"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}

_CORPUS = [
    "A gray cat with green eyes sits on a wooden table next to a cup of coffee.",
    "An astronaut in a white suit holds a helmet in front of an American flag.",
    "A rocket stands on the launch pad under a blue sky with white clouds.",
    "The background shows distant galaxies, bright stars and a dark sky.",
    "Two people walk along the beach while a dog runs beside them.",
    "Locate the phrases in the caption: a red car parked near a tall building.",
]


def _tokenizer():
    import json

    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizer

    from sculpt.testing.kit import CAPTION, GROUNDING

    bpe = ByteLevelBPETokenizer()
    # the scene's caption and phrases too: their words as whole tokens keep the grounding short (the ground
    # stage's tests give it 64 new tokens) and training quick
    bpe.train_from_iterator((_CORPUS + [CAPTION, *GROUNDING]) * 4, vocab_size=400, min_frequency=1,
                            show_progress=False, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # <s> <pad> </s> <unk>: BART's ids 0-3
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = BartTokenizer(vocab=state["vocab"], merges=merges, extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_special_tokens({"additional_special_tokens": FLORENCE_TOKENS})
    return tokenizer


def _processor(tokenizer):
    from transformers import CLIPImageProcessor, Florence2Processor

    image_processor = CLIPImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        image_seq_length=IMAGE_TOKENS,
    )
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                              post_processor_config=POST_PROCESSOR_CONFIG)


def _config(tokenizer):
    from transformers import Florence2Config

    text = dict(
        model_type="bart", vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=TEXT_POSITIONS, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=2, scale_embedding=False,
    )
    vision = dict(
        depths=[1, 1, 1, 1], embed_dim=[8, 16, 16, 32], num_heads=[1, 1, 1, 2], num_groups=[1, 1, 1, 2],
        window_size=2, projection_dim=32, max_position_embeddings=8, max_temporal_embeddings=4, drop_path_rate=0.0,
    )
    return Florence2Config(text_config=text, vision_config=vision,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"))


TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR = 200, 12, 1e-2
MIN_MARGIN = 1.0  # logits: every trained token must win by this much, in float32, bfloat16 and float16


def write(directory: str, seed: int = 0, train: bool = True) -> str:
    """Write the checkpoint into ``directory`` (created if needed); returns the directory.

    ``train=False`` leaves the weights random (and untested).
    """
    import os

    import torch
    from transformers import Florence2ForConditionalGeneration

    os.makedirs(directory, exist_ok=True)
    tokenizer = _tokenizer()
    processor = _processor(tokenizer)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(_config(tokenizer)).eval()
    if train:
        from sculpt.testing.kit import one_thread

        with one_thread():
            train_scene(model, processor, seed)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def scene_targets() -> dict[str, str]:
    """Caption chunk -> the generation that grounds it: every run of consecutive sentences of the caption, the
    whole caption first (the chunks ``sculpt.annotation.grounding.split_caption`` can cut it into), their GROUNDING phrases
    in caption order, each phrase followed by its boxes' location tokens."""
    from sculpt.annotation import grounding
    from sculpt.testing.kit import CAPTION, GROUNDING

    spans = grounding.sentence_spans(CAPTION)
    chunks = [CAPTION[spans[first][0]:spans[first + length - 1][1]]
              for length in range(len(spans), 0, -1) for first in range(len(spans) - length + 1)]
    targets = {}
    for chunk in chunks:
        found = sorted((chunk.lower().find(phrase), phrase) for phrase in GROUNDING if phrase in chunk.lower())
        targets[chunk] = "".join(phrase + "".join(f"<loc_{k}>" for box in GROUNDING[phrase] for k in box)
                                 for _, phrase in found)
    return targets


def _pictures(seed: int):
    """Photographs and a few noise and flat images, as the processor hands them to the model."""
    import numpy as np

    from sculpt.testing import samples

    noise = np.random.RandomState(seed)
    pictures = [samples.photo(name) for name in samples.PHOTOS]
    pictures += [(noise.rand(h, w, 3) * 255).astype(np.uint8) for h, w in ((64, 64), (50, 120), (120, 50))]
    return pictures + [np.zeros((40, 40, 3), np.uint8), np.full((30, 60, 3), 255, np.uint8)]


def train_scene(model, processor, seed: int = 0, steps: int = TRAIN_STEPS) -> None:
    """Teach the model the kit's scene: for ``<CAPTION_TO_PHRASE_GROUNDING>`` and any chunk of
    ``scene_targets``, greedy decoding and beam search give that chunk's target, whatever the image.

    Raises RuntimeError if the result does not decode the targets in float32, bfloat16 and float16 on images
    the training never saw.
    """
    import random

    import torch

    from sculpt.annotation import grounding

    rng = random.Random(seed)
    torch.manual_seed(seed)
    targets = scene_targets()
    chunks = list(targets)
    pixels = torch.cat([processor.image_processor(images=[p], return_tensors="pt")["pixel_values"] for p in _pictures(seed)])
    # all chunks padded to the longest, as the stage pads a batch of chunks
    prompts = processor(text=[grounding.TASK + chunk for chunk in chunks], images=[_pictures(seed)[-1]] * len(chunks),
                        padding="longest", return_tensors="pt")
    answers = processor.tokenizer([targets[chunk] for chunk in chunks], padding="longest", return_tensors="pt")
    labels = answers["input_ids"].masked_fill(answers["attention_mask"] == 0, -100)

    optimizer = torch.optim.Adam(model.parameters(), lr=TRAIN_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    model.train()
    for step in range(steps):
        which = torch.tensor([(step * TRAIN_BATCH + j) % len(chunks) for j in range(TRAIN_BATCH)])
        images = torch.tensor([rng.randrange(len(pixels)) for _ in range(TRAIN_BATCH)])
        loss = model(input_ids=prompts["input_ids"][which], attention_mask=prompts["attention_mask"][which],
                     pixel_values=pixels[images], labels=labels[which]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    _check(model, processor, seed, prompts, labels)


def _check(model, processor, seed, prompts, labels) -> None:
    """Teacher-forced check on unseen images (noise of other shapes): every target token wins by MIN_MARGIN."""
    import numpy as np
    import torch

    noise = np.random.RandomState(seed + 1)
    held_out = [(noise.rand(h, w, 3) * 255).astype(np.uint8) for h, w in ((300, 500), (700, 200))]
    pixels = torch.cat([processor.image_processor(images=[p], return_tensors="pt")["pixel_values"] for p in held_out])
    n = len(labels)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            model.to(dtype)
            for image in pixels:
                logits = model(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                               pixel_values=image.expand(n, -1, -1, -1).to(dtype), labels=labels).logits.float()
                keep = labels != -100
                right = logits[keep].gather(1, labels[keep][:, None])[:, 0]
                wrong = logits[keep].scatter(1, labels[keep][:, None], float("-inf")).max(1).values
                worst = (right - wrong).min().item()
                if worst < MIN_MARGIN:
                    raise RuntimeError(f"tiny Florence-2: the trained scene decodes with a logit margin of {worst:.2f} "
                                       f"< {MIN_MARGIN} in {dtype} on unseen images (training did not converge)")
    model.to(torch.float32)
