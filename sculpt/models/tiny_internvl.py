"""A seeded, tiny, random-weight InternVL in Hugging Face "-hf" format (as OpenGVLab/InternVL3-1B-hf).

The same files a real checkpoint has — config.json, model.safetensors, tokenizer, processor config, chat
template — so vLLM and transformers load it through their real code. The tokenizer is a byte-level BPE trained
here on a few sentences and handed to Qwen2's tokenizer class with InternVL's special tokens. 448-px tiles of
14-px patches give 256 image tokens per tile: two whole 128-token KV blocks, so prefix caching has something to
reuse on CPU too.
"""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_SIZE, PATCH, DOWNSAMPLE = 448, 14, 0.5
IMAGE_TOKENS = int((IMAGE_SIZE // PATCH) ** 2 * DOWNSAMPLE**2)  # per tile
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# Qwen2-style chat template; an image part becomes the processor's <IMG_CONTEXT> placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}{% elif part['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = [
    "A photograph of an astronaut in a white space suit holding a flag beside a model shuttle.",
    "a cat sitting on a red sofa next to a window with green plants, the sky is blue",
    "the brown dog runs across the grass while two people ride bicycles on the road.",
    "left right top bottom center background foreground behind in front of next to between",
    "Describe the image in detail. Name every object, region and part. Write one referring expression.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 , . ! ? : ; ( ) [ ] < > / ' \" - _",
]


def train_bpe(corpus: list[str], vocab_size: int) -> tuple[dict, list]:
    """(vocab, merges) of a byte-level BPE trained offline on ``corpus``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(CORPUS, 512)
    for token in SPECIAL_TOKENS:  # Qwen layout: special tokens follow the BPE vocabulary
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
        model_max_length=4096,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write(directory: str, seed: int = 0, max_tiles: int = 4) -> str:
    import torch
    from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2 import GotOcr2ImageProcessor
    from transformers.models.internvl import InternVLVideoProcessor

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
                                              image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
        video_processor=InternVLVideoProcessor(size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
        tokenizer=tokenizer,
        image_seq_length=IMAGE_TOKENS,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out)
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[PATCH, PATCH], norm_type="layer_norm",
                           use_mean_pooling=True, layer_scale_init_value=0.1),
        text_config=dict(model_type="qwen2", vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32,  # vLLM's CPU attention needs head_dim >= 32
                         max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=IMAGE_TOKENS,
        downsample_ratio=DOWNSAMPLE,
        tie_word_embeddings=False,
    )
    config.dtype = torch.float32
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                                               do_sample=False)
    model.save_pretrained(out)
    return str(out)
