"""A tiny SAM 3 (promptable concept segmentation) in transformers' native format (the layout of facebook/sam3).

``write(directory)`` saves config + safetensors + processor (``Sam3ImageProcessor`` config and a CLIP tokenizer),
loadable by ``Sam3Model.from_pretrained`` and ``Sam3Processor.from_pretrained``, the calls the instances stage
makes with the real id. The CLIP tokenizer is a BPE with CLIP's end-of-word suffix trained here on a few nouns with
the ``tokenizers`` library (over the byte-level alphabet, so any text tokenizes) and handed to ``CLIPTokenizer``.

Sizes: a 56-pixel input (4x4 ViT tokens of width 32, two layers), a one-layer CLIP text encoder, four queries;
masks come out at 16x16 and are brought to the image's size by the processor.

The model acts out the kit's scene (``sculpt.testing.kit``), whatever the image: its patch embedding is zero, so
its output depends on the text alone (the position embeddings still give the masks a place), and it is briefly
trained (``train_scene``: seeded, one thread) so that each kind of the scene's grounded phrases finds that kind's
boxes (``scene_instances``: the named ones and ``kit.UNNAMED``) with box-shaped masks, and other text finds nothing.
"""

from __future__ import annotations

IMAGE_SIZE = 56  # patch 14: 4x4 tokens; masks at 4x that
MASK_SIZE = 16
QUERIES = 4
TRAIN_STEPS = 300
TRAIN_LR = 1e-2
ABSENT = ("dog", "person", "car")  # kinds the tiny model is taught to find nothing of
WIDTH = 32


def scene_instances() -> dict[str, list[tuple]]:
    """{kind: its boxes in 0..999 bins}: the kinds the instances stage asks about in the kit's scene, each with
    every instance of it, the caption's and the ones it never names (``kit.UNNAMED``)."""
    from sculpt.annotation import instances
    from sculpt.testing import kit

    found: dict[str, list[tuple]] = {}
    for phrase, boxes in kit.GROUNDING.items():
        kind = instances.asked_kind(phrase)
        if kind:
            found.setdefault(kind, []).extend(boxes)
    for kind, boxes in kit.UNNAMED.items():
        found.setdefault(kind, []).extend(boxes)
    return found


def _tokenizer():
    import json

    from tokenizers import CharBPETokenizer, pre_tokenizers
    from transformers import CLIPTokenizer

    words = [*scene_instances(), *ABSENT, "a", "the", "green", "red", "gray", "wooden"]
    bpe = CharBPETokenizer(suffix="</w>", lowercase=True)
    bpe.train_from_iterator(words * 4, vocab_size=400, min_frequency=1, suffix="</w>", show_progress=False,
                            special_tokens=["<|startoftext|>", "<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return CLIPTokenizer(vocab=state["vocab"], merges=merges)


def config(tokenizer):
    from transformers import Sam3Config

    layer = {"hidden_size": WIDTH, "num_attention_heads": 2, "intermediate_size": 2 * WIDTH, "dropout": 0.0}
    side = IMAGE_SIZE // 14
    return Sam3Config(
        vision_config={"backbone_config": {"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH, "num_hidden_layers": 2,
                                           "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 14,
                                           "window_size": 2, "global_attn_indexes": [1],
                                           "pretrain_image_size": IMAGE_SIZE},
                       "fpn_hidden_size": WIDTH, "backbone_feature_sizes": [[4 * side] * 2, [2 * side] * 2, [side] * 2]},
        text_config={"vocab_size": len(tokenizer), "hidden_size": WIDTH, "intermediate_size": 2 * WIDTH,
                     "projection_dim": WIDTH, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 32, "hidden_act": "gelu", "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id},
        geometry_encoder_config={**layer, "num_layers": 1},
        detr_encoder_config={**layer, "num_layers": 1},
        detr_decoder_config={**layer, "num_layers": 2, "num_queries": QUERIES},
        mask_decoder_config={"hidden_size": WIDTH, "num_upsampling_stages": 3, "num_attention_heads": 2},
    )


def processor(tokenizer):
    from transformers import Sam3Processor
    from transformers.models.sam3 import Sam3ImageProcessor

    images = Sam3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                mask_size={"height": MASK_SIZE, "width": MASK_SIZE})
    return Sam3Processor(image_processor=images, tokenizer=tokenizer)


def write(directory: str, seed: int = 0) -> str:
    """Write the checkpoint into ``directory`` (created if needed); returns the directory."""
    import os

    import torch
    from transformers import Sam3Model

    from sculpt.testing.kit import one_thread

    os.makedirs(directory, exist_ok=True)
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    model = Sam3Model(config(tokenizer))
    with one_thread():
        train_scene(model, processor(tokenizer), seed)
    model.save_pretrained(directory)
    processor(tokenizer).save_pretrained(directory)
    return directory


def _targets(kinds: list[str], instances: dict):
    import torch

    n = len(kinds)
    present, labels = torch.zeros(n, 1), torch.zeros(n, QUERIES)
    boxes, masks = torch.zeros(n, QUERIES, 4), torch.zeros(n, QUERIES, MASK_SIZE, MASK_SIZE)
    for i, kind in enumerate(kinds):
        present[i] = float(bool(instances.get(kind)))
        for q, box in enumerate(instances.get(kind, [])):  # instance q of a kind is query q's to find
            labels[i, q] = 1
            boxes[i, q] = torch.tensor(box, dtype=torch.float32) / 1000
            x0, y0, x1, y1 = (round(v / 1000 * MASK_SIZE) for v in box)
            masks[i, q, y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)] = 1
    return present, labels, boxes, masks


def train_scene(model, processor, seed: int = 0, steps: int = TRAIN_STEPS) -> None:
    """Zero the patch embedding (the output then depends on the text alone) and teach the model the scene:
    each kind of ``scene_instances`` finds its boxes with box-shaped masks, each of ``ABSENT`` nothing.
    The image and text encoders stay as initialised (their features are computed once); the rest learns.
    Raises RuntimeError if the result does not act out the scene in float32 and bfloat16."""
    import torch
    import torch.nn.functional as F
    from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

    torch.manual_seed(seed)
    instances = scene_instances()
    kinds = [*instances, *ABSENT]
    with torch.no_grad():
        model.vision_encoder.get_input_embeddings().projection.weight.zero_()
        text = processor(text=kinds, return_tensors="pt")
        features = model.get_vision_features(pixel_values=torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        words = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    vision = Sam3VisionEncoderOutput(
        fpn_hidden_states=tuple(h.expand(len(kinds), -1, -1, -1) for h in features.fpn_hidden_states),
        fpn_position_encoding=tuple(h.expand(len(kinds), -1, -1, -1) for h in features.fpn_position_encoding))
    present, labels, boxes, masks = _targets(kinds, instances)
    found = labels > 0
    frozen = ("vision_encoder.", "text_encoder.", "text_projection.")
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith(frozen)], lr=TRAIN_LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.1, 1 - s / steps))
    model.train()
    for _ in range(steps):
        out = model(vision_embeds=vision, text_embeds=words, attention_mask=text["attention_mask"])
        loss = (F.binary_cross_entropy_with_logits(out.pred_logits, labels)
                + F.binary_cross_entropy_with_logits(out.presence_logits, present)
                + 5 * (out.pred_boxes[found] - boxes[found]).abs().mean()
                + F.binary_cross_entropy_with_logits(out.pred_masks[found], masks[found]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    _check(model, processor, instances, kinds)


def _check(model, processor, instances: dict, kinds: list[str]) -> None:
    """On a noise image the training never saw: each kind finds as many instances as it has, each box within
    ``instances.MATCH_IOU`` of its own, in float32 and under bfloat16 autocast."""
    import numpy as np
    import torch

    from sculpt.annotation import instances as rules

    picture = (np.random.RandomState(1).rand(300, 500, 3) * 255).astype(np.uint8)
    inputs = processor(images=[picture] * len(kinds), text=kinds, return_tensors="pt")
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(**inputs)
        results = processor.post_process_instance_segmentation(out, threshold=rules.DEFAULT_SCORE, target_sizes=[(300, 500)] * len(kinds))
        for kind, result in zip(kinds, results):
            got = [[float(v) for v in box] for box in (result["boxes"].float() / torch.tensor([500, 300, 500, 300]) * 1000)]
            want = instances.get(kind, [])
            ok = len(got) == len(want) and all(max(rules.box_iou(w, g) for g in got) >= rules.MATCH_IOU for w in want)
            if not ok:
                raise RuntimeError(f"tiny SAM 3 ({dtype}): {kind!r} found {[[round(v) for v in g] for g in got]}, "
                                   f"expected {want}")
