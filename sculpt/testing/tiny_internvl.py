"""A seeded, tiny, random-weight InternVL in Hugging Face "-hf" format (as OpenGVLab/InternVL3-1B-hf).

The same files a real checkpoint has — config.json, model.safetensors, tokenizer, processor config, chat
template — so vLLM and transformers load it through their real code. The tokenizer is a byte-level BPE trained
here on a few sentences and sculpt's prompts, handed to Qwen2's tokenizer class with InternVL's special tokens.
448-px tiles of 14-px patches give 256 image tokens per tile: two whole 128-token KV blocks, so prefix caching
has something to reuse on CPU too.
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
    # kit.NEGATIVE's words as whole tokens: the refer stage gives a negative 24 tokens
    "a yellow umbrella leaning against the wall, two plants standing beside it.",
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

    from sculpt.annotation import prompts
    from sculpt.testing.kit import CAPTION, CHAT, LISTENER_ANSWER, REASONING

    # sculpt's prompts too: their words as whole tokens make the prompts short (half the tokens), training quick;
    # and the scene's caption, which then fits the caption stage's 32 tokens, and the listener's box (its brackets
    # then tokens of their own: without, the box had not learnt in the steps the rest need)
    templates = [prompts.CAPTION_PROMPT, prompts.REFER_PROMPT, prompts.GROUP_REFER_PROMPT, prompts.NEGATIVE_PROMPT,
                 prompts.LISTENER_PROMPT, prompts.REASONING_PROMPT, prompts.CHAT_PROMPT]
    vocab, merges = train_bpe(CORPUS + [CAPTION, LISTENER_ANSWER, REASONING, CHAT] + templates, 1024)
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


TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR = 160, 7, 6e-3  # a batch holds one example of each task
# Phrases and words the refer prompts of the training set are about (besides the scene's own phrases).
_OTHER_WORDS = "cat sofa window plant dog sky road grass table cup rocket flag man woman tree wall floor".split()


def write(directory: str, seed: int = 0, max_tiles: int = 4, train: bool = True) -> str:
    """Write the checkpoint into ``directory``; ``train=False`` leaves the weights random (and untested)."""
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
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
                                              image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
        video_processor=InternVLVideoProcessor(size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
        tokenizer=tokenizer,
        image_seq_length=IMAGE_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
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
    if train:
        from sculpt.testing.kit import one_thread

        with one_thread():
            train_scene(model, processor, seed)
    return save_in_bfloat16(model, out)


def save_in_bfloat16(model, out) -> str:
    """Saved in bfloat16 and configured so: vLLM's dtype "auto" then loads exactly these weights, with no cast."""
    import torch

    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out)
    return str(out)


def chat_prompt(processor, text: str) -> str:
    """The prompt of one user turn (image placeholder, then ``text``) and the assistant header."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def _chat_ids(processor, text: str) -> list[int]:
    """Token ids of ``chat_prompt``, the image placeholder unexpanded."""
    return processor.tokenizer(chat_prompt(processor, text), add_special_tokens=False)["input_ids"]


def _expand(processor, ids: list[int], tiles: int) -> list[int]:
    """The processor's own image expansion: <img>, 256 <IMG_CONTEXT> per tile, </img>."""
    at = ids.index(processor.image_token_id)
    image = [processor.start_image_token_id] + [processor.image_token_id] * (IMAGE_TOKENS * tiles) + [processor.end_image_token_id]
    return ids[:at] + image + ids[at + 1:]


def _projector_inputs(model, pixel_values):
    """What ``get_image_features`` hands the multimodal projector: vision features after the pixel shuffle."""
    import torch

    seen = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.get_image_features(pixel_values=pixel_values)
    finally:
        hook.remove()
    return seen[0]


def _pictures(seed: int):
    """Photographs (square, landscape and portrait) and a few noise images: what the kit trains on."""
    import numpy as np
    from PIL import Image

    from sculpt.testing import samples

    noise = np.random.RandomState(seed)
    pictures = [Image.fromarray(samples.photo(name)) for name in samples.PHOTOS]
    return pictures + [Image.fromarray((noise.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in ((64, 64), (40, 90), (90, 40))]


def _caption(rng):
    """The caption a refer, group or negative prompt of the training set quotes: mostly the scene's."""
    from sculpt.testing.kit import CAPTION

    return CAPTION if rng.random() < 0.6 else rng.choice(CORPUS + ["A cat.", None])


def _box(rng, width: int, height: int):
    """A pixel box anywhere in the image, its sides from 1/100 of the image's to all of it (log-uniform): small
    boxes near a corner too, whose coordinates are all small numbers."""
    w, h = width * 10 ** rng.uniform(-2, 0), height * 10 ** rng.uniform(-2, 0)
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return x0, y0, x0 + w, y0 + h


def _refer_text(rng, width: int, height: int) -> str:
    from sculpt.annotation import prompts
    from sculpt.testing.kit import GROUNDING

    caption = _caption(rng)
    phrase = rng.choice(list(GROUNDING) + ["the " + rng.choice(_OTHER_WORDS), None])
    return prompts.refer_prompt(caption, phrase, _box(rng, width, height), width, height)


def _group_text(rng, width: int, height: int) -> str:
    """A group refer prompt: a phrase (the scene's, a plural of the corpus, or none) and 2-3 member boxes."""
    from sculpt.annotation import prompts
    from sculpt.testing.kit import GROUNDING

    caption = _caption(rng)
    phrase = rng.choice(list(GROUNDING) + [rng.choice(["the ", "two ", ""]) + rng.choice(_OTHER_WORDS) + "s", None])
    members = [_box(rng, width, height) for _ in range(rng.randint(2, 3))]
    whole = tuple(f(b[i] for b in members) for i, f in enumerate((min, min, max, max)))
    return prompts.refer_prompt(caption, phrase, whole, width, height, member_boxes=members)


def _negative_text(rng) -> str:
    """A negative prompt: some of the scene's phrases and the corpus's as what is present, 1-3 wanted."""
    from sculpt.annotation import prompts
    from sculpt.testing.kit import GROUNDING

    caption = _caption(rng)
    pool = list(GROUNDING) + ["the " + word for word in _OTHER_WORDS]
    return prompts.negative_prompt(caption, rng.sample(pool, rng.randint(1, 4)), rng.randint(1, 3))


def _reasoning_text(rng, width: int, height: int) -> str:
    """A reasoning prompt: a phrase (the scene's, the corpus's or none) and its box, or a group's member boxes."""
    from sculpt.annotation import prompts
    from sculpt.testing.kit import GROUNDING

    phrase = rng.choice(list(GROUNDING) + ["the " + rng.choice(_OTHER_WORDS), None])
    members = [_box(rng, width, height) for _ in range(rng.randint(2, 3))] if rng.random() < 0.3 else None
    return prompts.reasoning_prompt(_caption(rng), phrase, _box(rng, width, height), width, height, members)


def _chat_text(rng, width: int, height: int) -> str:
    """A chat prompt: 1-3 listed objects (the scene's phrases or the corpus's, one box each; few, as the prompt is
    the longest the kit trains on), 1-3 turns."""
    from sculpt.annotation import prompts
    from sculpt.testing.kit import GROUNDING

    pool = list(GROUNDING) + ["the " + word for word in _OTHER_WORDS]
    listed = [(phrase, [_box(rng, width, height)]) for phrase in rng.sample(pool, rng.randint(1, 3))]
    return prompts.chat_prompt(_caption(rng), listed, rng.randint(1, 3), width, height)


def _listen_text(rng) -> str:
    """A listener prompt: the scene's expressions, its phrases, or a few words of the corpus."""
    from sculpt.annotation import prompts
    from sculpt.testing.kit import EXPRESSION, GROUNDING, GROUP_EXPRESSION, NEGATIVE, REASONING

    words = " ".join(rng.sample(_OTHER_WORDS, rng.randint(2, 6)))
    return prompts.listener_prompt(rng.choice([EXPRESSION, GROUP_EXPRESSION, NEGATIVE, REASONING, *GROUNDING,
                                               "the " + words]))


def _prompt_text(rng, task: str, width: int, height: int) -> str:
    from sculpt.annotation import prompts

    if task == "listen":
        return _listen_text(rng)
    if task == "caption":
        return prompts.CAPTION_PROMPT
    if task == "refer":
        return _refer_text(rng, width, height)
    if task == "group":
        return _group_text(rng, width, height)
    if task == "reasoning":
        return _reasoning_text(rng, width, height)
    if task == "chat":
        return _chat_text(rng, width, height)
    return _negative_text(rng)


def train_scene(model, processor, seed: int = 0, steps: int = TRAIN_STEPS) -> dict:
    """Teach the model the kit's scene: greedy decoding gives ``kit.CAPTION`` for the caption prompt,
    ``kit.EXPRESSION`` for any refer prompt, ``kit.GROUP_EXPRESSION`` for any group refer prompt,
    ``kit.NEGATIVE`` for any negative prompt, ``kit.REASONING`` for any reasoning prompt and ``kit.LISTENER_ANSWER``
    for any listener prompt (``kit.CHAT`` for any chat prompt), then <|im_end|>,
    whatever the image and its tiling.

    Trained on real processed images (one tile, or two tiles and a thumbnail); the vision tower stays as
    initialised (its features are computed once), the projector and the language model learn. Raises
    RuntimeError if the result does not decode the scene, in float32 or bfloat16, on images it has not seen;
    returns the worst logit margins of that check, {dtype name: {task: margin}}.
    """
    import random

    import torch

    from sculpt.annotation import prompts
    from sculpt.testing.kit import CAPTION, CHAT, EXPRESSION, GROUP_EXPRESSION, LISTENER_ANSWER, NEGATIVE, REASONING

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = processor.tokenizer
    pad, eos = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = {task: tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
               for task, text in (("caption", CAPTION), ("refer", EXPRESSION), ("group", GROUP_EXPRESSION),
                                  ("negative", NEGATIVE), ("listen", LISTENER_ANSWER), ("reasoning", REASONING),
                                  ("chat", CHAT))}

    by_tiles: dict[int, list] = {}  # tile count -> [(picture, projector inputs)]
    for picture in _pictures(seed):
        for max_tiles in (1, 2):
            pixels = processor.image_processor(images=[picture], crop_to_patches=max_tiles > 1, max_patches=max_tiles,
                                               min_patches=1, return_tensors="pt")["pixel_values"]
            by_tiles.setdefault(len(pixels), []).append((picture, _projector_inputs(model, pixels)))
    caption_ids = _chat_ids(processor, prompts.CAPTION_PROMPT)
    # The image expansion above is the processor's own.
    picture, features = by_tiles[3][0]
    expected = processor(images=[picture], text=[chat_prompt(processor, prompts.CAPTION_PROMPT)], crop_to_patches=True,
                         max_patches=2, min_patches=1)["input_ids"][0]
    assert list(expected) == _expand(processor, caption_ids, 3), "InternVL processor expands images differently"

    def example(group, task):
        picture, features = group[rng.randrange(len(group))]
        prompt = caption_ids if task == "caption" else _chat_ids(processor, _prompt_text(rng, task, *picture.size))
        return _expand(processor, prompt, len(features)), answers[task], features

    for parameter in model.model.vision_tower.parameters():
        parameter.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=TRAIN_LR)
    # a short warm-up, then a linear decay
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps))
    model.train()
    for step in range(steps):
        group = by_tiles[3] if step % 4 == 3 else by_tiles[1]  # one tile count per batch: little padding
        # every task in every batch (TRAIN_BATCH of them, in turn): each learns at the same pace
        loss = _loss(model, [example(group, list(answers)[i % len(answers)]) for i in range(TRAIN_BATCH)], pad)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return _check(model, processor, seed, answers, pad)


def _loss(model, batch, pad: int):
    """Cross-entropy of the answers after their prompts (teacher forcing), and each answer token's logit margin."""
    import torch

    length = max(len(prompt) + len(answer) for prompt, answer, _ in batch)
    ids = torch.full((len(batch), length), pad)
    labels = torch.full((len(batch), length), -100)
    for row, (prompt, answer, _) in enumerate(batch):
        ids[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[row, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
    embeds = model.get_input_embeddings()(ids)
    projector = model.model.multi_modal_projector
    projected = projector(torch.cat([features for _, _, features in batch]).to(embeds.dtype))
    embeds = embeds.masked_scatter((ids == model.config.image_token_id).unsqueeze(-1),
                                   projected.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
    # Padding goes last, so causal attention alone keeps every real token from seeing it: no mask needed.
    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    targets = labels[:, 1:]
    logits = model.lm_head(hidden[:, :-1][targets != -100]).float()
    targets = targets[targets != -100]
    right = logits.gather(1, targets[:, None])[:, 0]
    wrong = logits.scatter(1, targets[:, None], float("-inf")).max(1).values
    return torch.nn.functional.cross_entropy(logits, targets), right - wrong


MIN_MARGIN = 1.0  # logits: the trained answer must win every step by this much, in float32 and bfloat16


def _check(model, processor, seed, answers, pad) -> dict:
    """Teacher-forced check of every task on images the training never saw, at 1 to 7 tiles, in float32 and
    bfloat16: {dtype name: {task: worst margin}}."""
    import random

    import numpy as np
    import torch
    from PIL import Image

    rng = random.Random(seed + 1)
    noise = np.random.RandomState(seed + 1)
    held_out = [Image.fromarray((noise.rand(h, w, 3) * 255).astype(np.uint8)) for h, w in ((300, 500), (700, 200))]
    held_out.append(Image.fromarray(np.zeros((100, 100, 3), np.uint8)))
    requests = [(picture, max_tiles, {task: _chat_ids(processor, _prompt_text(rng, task, *picture.size))
                                      for task in answers})
                for picture in held_out for max_tiles in (1, 2, 6)]
    worst = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            margins = {task: [] for task in answers}
            for picture, max_tiles, prompt_ids in requests:
                pixels = processor.image_processor(images=[picture], crop_to_patches=max_tiles > 1,
                                                   max_patches=max_tiles, min_patches=1, return_tensors="pt")["pixel_values"]
                features = _projector_inputs(model, pixels)
                for task, prompt in prompt_ids.items():
                    batch = [(_expand(processor, prompt, len(pixels)), answers[task], features)]
                    margins[task].append(_loss(model, batch, pad)[1])
            name = str(dtype).removeprefix("torch.")
            worst[name] = {task: torch.cat(m).min().item() for task, m in margins.items()}
            task, margin = min(worst[name].items(), key=lambda item: item[1])
            if margin < MIN_MARGIN:
                raise RuntimeError(f"tiny InternVL: the trained scene's {task} answer decodes with a logit margin "
                                   f"of {margin:.2f} < {MIN_MARGIN} in {name} on unseen images (training did not "
                                   "converge)")
    model.to(torch.float32)
    return worst
