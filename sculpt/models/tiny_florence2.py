"""A tiny random-weight Florence-2 in transformers' native format (the layout of florence-community/Florence-2-*).

``write(directory)`` saves config + safetensors + processor (CLIP image processor, post-processor config) +
tokenizer, loadable by ``Florence2ForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``.
The tokenizer is a byte-level BPE trained here with the ``tokenizers`` library and handed to Florence-2's own
tokenizer class (BART's), with Florence-2's special tokens, ``<loc_0>``…``<loc_999>`` and ``<image>`` added.

The image is 64×64 pixels (2×2 vision tokens + 1 = 5 image tokens, the real model has 24×24 + 1 = 577) and the
text encoder has 160 positions, so a caption of a few sentences already needs splitting.
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

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # <s> <pad> </s> <unk>: BART's ids 0-3
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


def write(directory: str, seed: int = 0) -> str:
    """Write the tiny checkpoint into ``directory`` (created if needed); returns the directory."""
    import os

    import torch
    from transformers import Florence2ForConditionalGeneration

    os.makedirs(directory, exist_ok=True)
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(_config(tokenizer)).eval()
    model.save_pretrained(directory)
    _processor(tokenizer).save_pretrained(directory)
    return directory
