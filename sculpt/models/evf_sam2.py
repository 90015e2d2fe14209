"""EVF-SAM2 (hustvl/EVF-SAM): segments an image from a referring expression alone; the verify stage's model.

EVF-SAM has no package and BEiT-3 is not in transformers, so sculpt carries this module. It follows the
reference ``model/evf_sam2.py`` + ``inference.py`` and loads the official checkpoints (``YxZhang/evf-sam2``,
``YxZhang/evf-sam2-multitask``) strictly:

* ``visual_model.*`` is a whole ``sam2`` ``SAM2Base`` built from the SAM 2.0 config of ``sam_scale`` (EVF-SAM2
  freezes SAM2 during training, so these are SAM 2.0 weights, not SAM 2.1). The reference renamed
  ``CXBlock.gamma`` to ``.weight`` (transformers rewrites "gamma" keys on load), so the checkpoint says
  ``memory_encoder.fuser.layers.N.weight``; hooks on those blocks translate both ways.
* ``mm_extractor.beit3.*`` is BEiT-3 (torchscale's multiway encoder, subln, pre-norm, GELU): way A for the
  image tokens, way B for the text tokens, one attention over both.
* ``text_hidden_fcs.0.{0,2}.*``: Linear, ReLU, Linear from the vision CLS output to one sparse prompt token.

Inference as the reference does it: BEiT-3 sees the image resized to 224 (bicubic, no antialias, mean/std 0.5)
and the XLM-R sentencepiece tokens; SAM2 sees the image squash-resized to 1024 (bilinear on uint8) with
ImageNet mean/std; the prompt token plus the no-mask dense embedding go to SAM2's mask decoder for its single
mask (``multimask_output=False``), which is upsampled straight to the original size and thresholded at 0.
All expressions of one image run as one padded batch (padded text positions are masked keys, so padding
does not change the result).

Reusing the mask stage's SAM2 image embedding: ``Predictor.predict(..., features=)`` takes one in
``SAM2ImagePredictor._features`` format, but the verify stage recomputes it. The masker's default
(facebook/sam2.1-hiera-large) is SAM 2.1, not EVF-SAM2's SAM 2.0 (``same_image_features`` checks two weight sets);
even with equal weights SAM2ImagePredictor resizes with antialiasing and EVF-SAM2 does not; and carrying the
embedding from mask through refer to verify costs ~8 MB (fp16) per image in the object store
(benchmarks/verify_embedding.py measures the embedding's share of the verify step).

A checkpoint directory holds ``config.json`` (``sam_scale``, ``mm_extractor_scale``, ``hidden_size``,
``out_dim``), the weights (``model.safetensors``, ``pytorch_model.bin`` or a sharded index of either) and
``sentencepiece.bpe.model``. Two extra config keys describe the tiny test checkpoints: ``beit3`` (BEiT-3 sizes)
and ``sam2_overrides`` (Hydra overrides of the SAM2 config).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sculpt.annotation.verify import SEMANTIC_PREFIX, is_multitask
from sculpt.models import precision, sam2_features
from sculpt.models.beit3 import BEIT3_SCALES, Beit3, Beit3Config

SAM2_CONFIGS = {"large": "configs/sam2/sam2_hiera_l.yaml", "tiny": "configs/sam2/sam2_hiera_t.yaml"}
TOKENIZER_FILE = "sentencepiece.bpe.model"
SAM_MEAN = (123.675, 116.28, 103.53)  # ImageNet mean/std on the 0-255 scale
SAM_STD = (58.395, 57.12, 57.375)
HUB_FILES = ("*.json", "*.safetensors", "pytorch_model*.bin", TOKENIZER_FILE)  # what a download from the hub needs


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not match the module tree; the message names the keys."""


@dataclass(frozen=True)
class EvfConfig:
    sam_scale: str = "large"  # SAM2 config: see SAM2_CONFIGS
    mm_extractor_scale: str = "large"  # BEiT-3 size: see BEIT3_SCALES
    hidden_size: int = 1024  # BEiT-3 width, the projection's input
    out_dim: int = 256  # SAM2 prompt width, the projection's output
    beit3: dict = field(default_factory=dict)  # sculpt extension: Beit3Config fields replacing the scale's
    sam2_overrides: tuple = ()  # sculpt extension: Hydra overrides of the SAM2 config

    @classmethod
    def load(cls, path: str) -> "EvfConfig":
        """From a checkpoint's config.json; keys this module does not use (torch_dtype, ...) are ignored."""
        with open(path) as f:
            data = {k: v for k, v in json.load(f).items() if k in {f.name for f in fields(cls)}}
        config = cls(**{**data, "sam2_overrides": tuple(data.get("sam2_overrides", ()))})
        if config.sam_scale not in SAM2_CONFIGS:
            raise ValueError(f"{path}: sam_scale={config.sam_scale!r}, expected one of {sorted(SAM2_CONFIGS)}")
        if config.mm_extractor_scale not in BEIT3_SCALES and not config.beit3:
            raise ValueError(f"{path}: mm_extractor_scale={config.mm_extractor_scale!r}, expected one of {sorted(BEIT3_SCALES)}")
        return config

    def beit3_config(self) -> Beit3Config:
        base = BEIT3_SCALES.get(self.mm_extractor_scale, Beit3Config())
        return Beit3Config(**{**base.__dict__, **self.beit3})

    def to_json(self) -> dict:
        """config.json as the reference's EvfConfig writes it (plus the two extensions when set)."""
        data = {"architectures": ["EvfSam2Model"], "model_type": "evf", **self.__dict__}
        data["sam2_overrides"] = list(self.sam2_overrides)
        return {k: v for k, v in data.items() if v not in ({}, [])}


def _official_gamma(module, state_dict, prefix, *_):  # state_dict post-hook: gamma -> weight (checkpoint layout)
    if prefix + "gamma" in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(prefix + "gamma")


def _load_gamma(module, state_dict, prefix, *_):  # load pre-hook: weight -> gamma (sam2's attribute)
    if prefix + "weight" in state_dict:
        state_dict[prefix + "gamma"] = state_dict.pop(prefix + "weight")


def build_sam2(config: EvfConfig, device="cpu"):
    """The SAM2Base of the reference (whole: its checkpoint holds the video memory modules too)."""
    from sam2.build_sam import build_sam2 as sam2_build
    from sam2.modeling.memory_encoder import CXBlock

    model = sam2_build(SAM2_CONFIGS[config.sam_scale], None, device=device, hydra_overrides_extra=list(config.sam2_overrides))
    for module in model.modules():
        if isinstance(module, CXBlock):
            module.register_state_dict_post_hook(_official_gamma)
            module.register_load_state_dict_pre_hook(_load_gamma)
    return model


class EvfSam2(nn.Module):
    """The reference's EvfSam2Model module tree: ``visual_model``, ``mm_extractor.beit3``, ``text_hidden_fcs``.

    ``device="meta"`` builds the shapes only (SAM2's Hiera needs real tensors to build, so it moves there after);
    ``empty=True`` leaves BEiT-3 uninitialised for weights that are loaded next.
    """

    def __init__(self, config: EvfConfig, device="cpu", empty=False):
        super().__init__()
        self.config = config
        beit = config.beit3_config()
        if beit.embed_dim != config.hidden_size:
            raise ValueError(f"hidden_size={config.hidden_size} but BEiT-3 is {beit.embed_dim} wide")
        self.visual_model = build_sam2(config, "cpu" if device == "meta" else device).to(device)
        if self.visual_model.sam_prompt_embed_dim != config.out_dim:
            raise ValueError(f"out_dim={config.out_dim} but SAM2 prompts are {self.visual_model.sam_prompt_embed_dim} wide")
        with torch.device("meta" if empty or device == "meta" else device):
            self.mm_extractor = nn.ModuleDict({"beit3": Beit3(beit)})
            hidden = config.hidden_size
            self.text_hidden_fcs = nn.ModuleList([nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, config.out_dim))])
        if empty and device != "meta":
            self.mm_extractor.to_empty(device=device)
            self.text_hidden_fcs.to_empty(device=device)

    @property
    def beit3(self) -> Beit3:
        return self.mm_extractor["beit3"]

    def image_features(self, sam_images):
        """SAM2 image embedding, as ``SAM2ImagePredictor.set_image`` computes it (its ``_features`` format), through
        SAM2Base's public API (``sculpt.models.sam2_features``)."""
        return sam2_features.image_features(self.visual_model, sam_images)

    def prompts(self, beit_images, input_ids, attention_mask):
        """One SAM2 sparse prompt token per expression: the projected vision CLS output, N×1×out_dim."""
        hidden = self.beit3(beit_images.expand(len(input_ids), -1, -1, -1), input_ids, attention_mask)
        return self.text_hidden_fcs[0](hidden[:, :1])

    def decode(self, features, prompts):
        """Low-resolution mask logits (N×h×w), one mask per prompt, as hustvl's EvfSam2Model decodes them in
        training and in ``inference`` (``multimask_output=False``: SAM2's single-mask token, with its own fallback to
        the most stable of the other three where configured, ``dynamic_multimask_via_stability``)."""
        sam = self.visual_model
        _, dense = sam.sam_prompt_encoder(points=None, boxes=None, masks=None)  # the no-mask embedding
        logits, _, _, _ = sam.sam_mask_decoder(
            image_embeddings=features["image_embed"],
            image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=prompts.to(dense.dtype),
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=True,
            high_res_features=features["high_res_feats"],
        )
        return logits[:, 0]


FEATURE_KEYS = ("image_encoder.", "sam_mask_decoder.conv_s0.", "sam_mask_decoder.conv_s1.", "no_mem_embed")


def same_image_features(model: EvfSam2, sam2_state: dict) -> bool:
    """Whether a SAM2 state dict (a sam2 checkpoint's ``["model"]``, or ``SAM2Base.state_dict()``) holds the weights
    behind EVF-SAM2's image features (encoder, the decoder's high-resolution projections, no_mem_embed); only
    then may its image embedding stand in for EVF-SAM2's."""
    def features(state):
        return {k: v for k, v in state.items() if k.startswith(FEATURE_KEYS)}

    mine, theirs = features(model.visual_model.state_dict()), features(sam2_state)
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k].cpu(), theirs[k].cpu().to(mine[k].dtype)) for k in mine
    )


def load_weights(model: EvfSam2, directory: str) -> None:
    """Load a checkpoint directory into the model; any missing or unexpected key is an error naming the keys."""
    from huggingface_hub import load_torch_model

    result = load_torch_model(model, directory, strict=False, safe=False, weights_only=True, map_location="cpu")
    if result.missing_keys or result.unexpected_keys:
        def show(keys):
            keys = sorted(keys)
            return f"{len(keys)} {keys[:12]}{' ...' if len(keys) > 12 else ''}"

        raise CheckpointMismatch(
            f"{directory} does not match the EVF-SAM2 module tree: missing keys {show(result.missing_keys)}; "
            f"unexpected keys {show(result.unexpected_keys)}"
        )


# ---------------------------------------------------------------- pre/post-processing and the predictor


def _chw(image) -> torch.Tensor:
    """1×3×H×W uint8 of an H×W×3 image: a numpy array, or a tensor on any device (which it stays on)."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.require(image, requirements=["C", "W"]))
    return image.permute(2, 0, 1)[None]


def beit3_input(image, size: int = 224) -> torch.Tensor:
    """1×3×size×size: [0, 1] floats resized bicubic without antialias (torchvision's tensor Resize with
    antialias=None, as the reference calls it), then normalised with mean = std = 0.5. ``image``: H×W×3 uint8,
    numpy or a tensor on the device that is to do the work."""
    x = _chw(image).float() / 255
    x = F.interpolate(x, (size, size), mode="bicubic", align_corners=False, antialias=False)
    return (x - 0.5) / 0.5


def sam2_input(image, size: int = 1024) -> torch.Tensor:
    """1×3×size×size: the image squash-resized bilinear and rounded to whole levels (the reference resizes the
    uint8 image: within one level of it), ImageNet-normalised; ``image`` as for ``beit3_input``. Resized as
    floats: CUDA's bilinear kernel has no uint8 path."""
    x = F.interpolate(_chw(image).float(), (size, size), mode="bilinear", align_corners=False).round_()
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (SAM_MEAN, SAM_STD))
    return (x - mean) / std


def upsample(logits: torch.Tensor, height: int, width: int) -> np.ndarray:
    """N×h×w logits -> N×H×W bool masks (bilinear to the original size, > 0)."""
    return upsample_tensor(logits, height, width).cpu().numpy()


def upsample_tensor(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``upsample``'s masks as a bool tensor on the logits' device."""
    return F.interpolate(logits[:, None].float(), (height, width), mode="bilinear", align_corners=False)[:, 0] > 0


TOKENIZER_PROBES = ("[semantic] the second man from the left, in a dark-blue jacket holding 2 cups", "zebra top left")


def load_tokenizer(directory: str):
    """XLM-R's tokenizer (fairseq ids: <s>=0, <pad>=1, </s>=2, <unk>=3) on the checkpoint's sentencepiece model.

    The reference runs the sentencepiece-backed (slow) XLMRobertaTokenizer; transformers 5 has only the
    converted one, exact for unigram models (XLM-R's kind). Probe strings check the two agree, so that a
    sentencepiece model the conversion gets wrong (e.g. BPE) fails here instead of silently shifting tokens.
    """
    import sentencepiece
    from transformers import XLMRobertaTokenizer

    model_file = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"{directory}: no {TOKENIZER_FILE} (the XLM-R sentencepiece model)")
    tokenizer = XLMRobertaTokenizer.from_pretrained(directory, padding_side="right")
    pieces = sentencepiece.SentencePieceProcessor(model_file=model_file)
    for text in TOKENIZER_PROBES:
        slow = [0, *(i + 1 if i else 3 for i in pieces.encode(text)), 2]  # fairseq offset; sentencepiece's <unk> -> 3
        if tokenizer(text)["input_ids"] != slow:
            raise ValueError(f"{model_file}: transformers' XLMRobertaTokenizer disagrees with sentencepiece on {text!r}")
    return tokenizer


def default_prefix(source: str) -> str:
    """The reference's prompt prefix: "[semantic] " for the multitask checkpoints, else none."""
    return SEMANTIC_PREFIX if is_multitask(source) else ""


def resolve(source: str) -> str:
    """A local checkpoint directory as is; a hub id downloaded (config, weights, tokenizer) into the HF cache."""
    if os.path.isdir(source):
        return source
    from huggingface_hub import snapshot_download

    return snapshot_download(source, allow_patterns=list(HUB_FILES))


class Predictor:
    """EVF-SAM2 on one device: ``predict(image, expressions)`` -> N×H×W bool masks.

    The weights stay float32; a reduced ``dtype`` runs the forward pass under autocast (``sculpt.models.precision``).
    """

    def __init__(self, model: EvfSam2, tokenizer, prefix: str = "", device="cpu", dtype: str = "float32"):
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.tokenizer, self.prefix, self.device, self.dtype = tokenizer, prefix, torch.device(device), dtype
        self.image_size = model.visual_model.image_size
        self.beit_size = model.config.beit3_config().img_size
        self.max_tokens = model.config.beit3_config().max_text_positions - 2  # positions start at row 2

    @torch.inference_mode()
    def image_features(self, image) -> dict:
        """The SAM2 image embedding of an H×W×3 uint8 RGB image, numpy or a tensor (reusable across ``predict``
        calls); resized and normalised on the model's device."""
        with precision.autocast(self.device.type, self.dtype):
            return self.model.image_features(sam2_input(torch.as_tensor(image, device=self.device), self.image_size))

    def predict(self, image: np.ndarray, expressions: list[str], features: dict | None = None, chunk: int = 8) -> np.ndarray:
        return self.predict_tensor(image, expressions, features, chunk).cpu().numpy()

    @torch.inference_mode()
    def predict_tensor(self, image, expressions: list[str], features: dict | None = None,
                       chunk: int = 8) -> torch.Tensor:
        """``predict``'s N×H×W bool masks as a tensor on the model's device (e.g. for ``sculpt.annotation.rle.encode_tensors``);
        ``image`` may be a tensor already there (``sculpt.annotation.images.decode_on``)."""
        image = torch.as_tensor(image, device=self.device)
        height, width = image.shape[:2]
        if not expressions:
            return torch.zeros((0, height, width), dtype=torch.bool, device=self.device)
        if features is None:
            features = self.image_features(image)
        tokens = self.tokenizer([self.prefix + e for e in expressions], padding=True, truncation=True,
                                max_length=self.max_tokens, return_tensors="pt")
        with precision.autocast(self.device.type, self.dtype):
            prompts = self.model.prompts(beit3_input(image, self.beit_size),
                                         tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
            logits = self.model.decode(features, prompts)
        return torch.cat([upsample_tensor(logits[i : i + chunk], height, width) for i in range(0, len(logits), chunk)])


def load(source: str, device: str | None = None, dtype: str | None = None, prefix: str | None = None) -> Predictor:
    """EVF-SAM2 from a hub id or a local checkpoint directory, weights checked strictly.

    device and dtype follow ``sculpt.models.precision.resolve`` (bfloat16 or float16 on CUDA, float32 on the CPU unless
    asked); prefix: prepended to every expression (None: ``default_prefix(source)``).
    """
    directory = resolve(source)
    config = EvfConfig.load(os.path.join(directory, "config.json"))
    device, dtype = precision.resolve(device, dtype)
    model = EvfSam2(config, device=device, empty=True)
    load_weights(model, directory)
    return Predictor(model, load_tokenizer(directory), default_prefix(source) if prefix is None else prefix, device, dtype)
