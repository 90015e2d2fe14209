"""A tiny random-weight EVF-SAM2 checkpoint in the official on-disk layout, for offline tests and benchmarks.

``write(directory)`` saves what a ``YxZhang/evf-sam2`` snapshot holds: ``config.json`` (model_type "evf"),
``model.safetensors`` with the official keys (``visual_model.*``, ``mm_extractor.beit3.*``,
``text_hidden_fcs.0.{0,2}.*``), ``sentencepiece.bpe.model`` (a unigram sentencepiece model, as XLM-R's is,
trained here on a few expressions) and ``tokenizer_config.json``. BEiT-3 is 2 layers of width 32; SAM2 is the
SAM 2.0 tiny config narrowed to width 32 through Hydra overrides (``image_size`` stays 1024).
"""

from __future__ import annotations

import io
import json
import os

CORPUS = [
    "the dog on the left with a red collar",
    "a man in a blue shirt holding a white cup near the window",
    "the tallest tree behind the small white house",
    "sky above the snowy mountains in the background",
    "zebra top left",
    "the cat sleeping on the wooden chair to the right of the table",
    "green leaves of the plant in the bottom corner",
    "the second car from the right parked next to the red building",
]

BEIT3 = {"embed_dim": 32, "layers": 2, "heads": 2, "ffn_dim": 64, "vocab_size": 128, "max_text_positions": 256}

SAM2_OVERRIDES = (
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,1,2]",
    "++model.image_encoder.trunk.global_att_blocks=[4]",
    "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.memory_attention.d_model=32",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32",
    "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16",
    "++model.memory_encoder.in_dim=32",
    "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.mask_downsampler.embed_dim=32",
    "++model.memory_encoder.fuser.layer.dim=32",
    "++model.memory_encoder.fuser.num_layers=1",
)


def config():
    from sculpt.models.evf_sam2 import EvfConfig

    return EvfConfig(sam_scale="tiny", mm_extractor_scale="tiny", hidden_size=32, out_dim=32, beit3=BEIT3, sam2_overrides=SAM2_OVERRIDES)


def sentencepiece_model() -> bytes:
    import sentencepiece

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, model_type="unigram", vocab_size=100,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    return buffer.getvalue()


def write(directory: str, seed: int = 0) -> str:
    """Write the checkpoint into ``directory`` (created if needed); returns the directory."""
    import torch
    from safetensors.torch import save_file

    from sculpt.models.evf_sam2 import TOKENIZER_FILE, EvfSam2

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, TOKENIZER_FILE), "wb") as f:
        f.write(sentencepiece_model())
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512, "padding_side": "right"}, f, indent=2)
    cfg = config()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_json(), f, indent=2)
    torch.manual_seed(seed)
    model = EvfSam2(cfg)
    with torch.no_grad():  # random, not the zeros/ones of a fresh init, so that loading is seen to matter
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.02)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    return directory
