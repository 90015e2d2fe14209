"""The mask stage: SAM2 turns each grounded box into a mask (the ``sam2`` package: ``SAM2Base``'s public modules).

Images are decoded on the model's device (``sculpt.annotation.images.decode_on``: nvJPEG on CUDA), squashed there to
SAM2's square input and normalised there. The images of a batch are embedded together (``images_at_once`` at a time,
``sculpt.models.sam2_features``); all boxes of an image go to the mask decoder as one batched prompt, as
``SAM2ImagePredictor.predict`` would give them. The decoder's low-resolution logits stay on the device and are
brought to the image's own resolution a few masks at a time and turned into COCO RLE at once, so an image with
many boxes never holds all its full-resolution float masks in memory. Thresholding and the RLE run lengths happen
on the model's device (``sculpt.annotation.rle.encode_tensors``); full masks never cross to the host, pycocotools
only compresses the runs.

``SAM2ImagePredictor`` itself is not used: its ``predict``/``predict_batch`` bring all masks of an image to full
resolution at once (N×H×W float32, then copied to the host: 675 MB for 50 boxes on a 1500×2250 image, see
benchmarks/masker_memory.py), even when only the low-resolution logits it also returns are wanted, and those are
clamped to ±32 (for use as a mask prompt), which can move an edge pixel of the upsampled mask. Its prompt encoder
and mask decoder are public modules of the model; they are called here as the predictor calls them, with the same
results (tests/test_ground_mask_actors.py compares them with the stock predictor's).
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np

from sculpt.annotation import groups, images, rle
from sculpt.models import precision, sam2_features
from sculpt import schema
from sculpt.stage import Stage


def build_sam2_model(model: str, device: str):
    """A SAM2 model from a hub id known to sam2 (e.g. facebook/sam2.1-hiera-large) or a local directory.

    The directory holds one checkpoint ``*.pt`` (``{"model": state_dict}``) and either one Hydra config ``*.yaml``
    or none, when the checkpoint keeps its official file name (e.g. sam2.1_hiera_large.pt) and sam2's own config
    for it is used.
    """
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES, build_sam2, build_sam2_hf

    if not os.path.isdir(model):
        if model not in HF_MODEL_ID_TO_FILENAMES:
            raise ValueError(f"{model!r}: neither a directory nor a model id known to sam2 ({sorted(HF_MODEL_ID_TO_FILENAMES)})")
        return build_sam2_hf(model, device=device)
    checkpoints = glob.glob(os.path.join(model, "*.pt"))
    configs = glob.glob(os.path.join(model, "*.yaml"))
    if len(checkpoints) != 1 or len(configs) > 1:
        raise ValueError(f"{model}: expected one *.pt and at most one *.yaml, found {checkpoints + configs}")
    if not configs:
        packaged = {ckpt: config for config, ckpt in HF_MODEL_ID_TO_FILENAMES.values()}
        name = os.path.basename(checkpoints[0])
        if name not in packaged:
            raise ValueError(f"{model}: no *.yaml and {name} is not an official sam2 checkpoint name")
        return build_sam2(packaged[name], checkpoints[0], device=device)
    return _build_with_config_dir(configs[0], checkpoints[0], device)


def _build_with_config_dir(config: str, checkpoint: str, device: str):
    # build_sam2 resolves configs by name in Hydra's search path, which sam2 points at its own package; a config
    # elsewhere needs that directory as the search path while it is composed, then sam2's own setting back.
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from sam2.build_sam import build_sam2

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=os.path.dirname(os.path.abspath(config)), version_base="1.2"):
            return build_sam2(os.path.basename(config), checkpoint, device=device)
    finally:
        GlobalHydra.instance().clear()
        initialize_config_module("sam2", version_base="1.2")


class Masker(Stage):
    """Fills ``mask``, ``area`` and ``mask_score`` of every object of a row that has a box and no mask yet.

    Params (all optional; ``model``, from the config's ``models.mask``, is a sam2 hub id or a local directory, see
    ``build_sam2_model``):

    - ``mask_threshold`` (0.0): logit threshold (as ``SAM2ImagePredictor``'s)
    - ``masks_at_once`` (8): masks brought to full resolution and RLE-encoded together
    - ``images_at_once`` (4): images whose SAM2 embeddings are computed as one batch
    - ``groups`` (true): add a multi-object group for each phrase grounded to several masked boxes
      (``sculpt.annotation.groups``: the union of their masks, its members listed)
    - ``device``, ``dtype``: see ``sculpt.models.precision`` (None: bfloat16/float16 autocast on CUDA, float32 on CPU)
    """

    name = "mask"
    model_key = "mask"
    defaults = {"mask_threshold": 0.0, "masks_at_once": 8, "images_at_once": 4, "groups": True, "device": None,
                "dtype": None}

    def setup(self) -> None:
        self.device, self.dtype = precision.resolve(self.params["device"], self.params["dtype"])
        self.model = build_sam2_model(self.params["model"], self.device)  # a SAM2Base, in eval mode
        self.mask_threshold = float(self.params["mask_threshold"])

    def process(self, rows: list[dict]) -> None:
        todo = {id(row): [obj for obj in row["objects"] or [] if obj.get("box") is not None and obj.get("mask") is None
                          and not obj.get("error")] for row in rows}
        rows = [row for row in rows if todo[id(row)]]
        work = []  # (image on the device, objects with usable boxes) per image
        for row, image in zip(rows, images.decode_on(self.device, [row["image_bytes"] for row in rows])):
            if isinstance(image, Exception):
                schema.mark_error(row, self.name, image)
                continue
            height, width = image.shape[:2]
            ready = []
            for obj in todo[id(row)]:
                problem = box_problem(obj["box"], width, height)
                if problem:
                    obj["error"] = f"{self.name}: {problem}"
                else:
                    ready.append(obj)
            if ready:
                work.append((image, ready))
        step = int(self.params["images_at_once"])
        for i in range(0, len(work), step):
            chunk = work[i:i + step]
            boxes = [np.array([obj["box"] for obj in ready], dtype=np.float32) for _, ready in chunk]
            for (_, ready), (masks, scores) in zip(chunk, self.predict_images([image for image, _ in chunk], boxes)):
                for obj, mask, score in zip(ready, masks, scores):
                    obj.update(mask=mask, area=rle.area(mask), mask_score=float(score))
        if self.params["groups"]:
            for row in rows:
                made = groups.build_groups(row["objects"])
                if made:
                    row["objects"] += [schema.new_object(**group) for group in made]
                    row["grounded_caption"] = groups.grounded_caption(row["objects"])

    def predict(self, image, boxes: np.ndarray) -> tuple[list[dict], np.ndarray]:
        """RLE masks at the image's resolution and SAM2's predicted IoUs for N boxes (x0, y0, x1, y1 pixels);
        ``image``: H×W×3 uint8, numpy or a tensor."""
        return self.predict_images([image], [boxes])[0]

    def predict_images(self, pictures: list, boxes: list[np.ndarray]) -> list[tuple[list[dict], np.ndarray]]:
        """``predict`` for several images: their embeddings computed as one batch, then each image's boxes.

        SAM2 squashes every image to its square input size; that resize is done here on the device
        (``images.squash``), and the boxes are given in the squashed frame, which is what the predictor's own
        normalisation (corners / image size x input size) would make of them.
        """
        import torch

        side = self.model.image_size
        squashed, scaled, sizes = [], [], []
        for picture, image_boxes in zip(pictures, boxes):
            picture = torch.as_tensor(picture, device=self.device)
            height, width = picture.shape[:2]
            squashed.append(images.squash(picture, side))
            scaled.append(torch.as_tensor(image_boxes * np.array([side / width, side / height] * 2, dtype=np.float32),
                                          device=self.device))
            sizes.append((height, width))
        with self.device_turn, torch.inference_mode(), precision.autocast(self.device, self.dtype):
            features = sam2_features.image_features(self.model, normalise(torch.stack(squashed)))
            decoded = [self._decode(features, i, image_boxes) for i, image_boxes in enumerate(scaled)]
        return [(self._rles(logits, size), scores.float().cpu().numpy())
                for (logits, scores), size in zip(decoded, sizes)]

    def _decode(self, features: dict, index: int, boxes):
        """Low-resolution logits (N×1×h×w, unclamped) and predicted IoUs (N) of one image's N boxes (in the input
        frame), prompted as ``SAM2ImagePredictor`` prompts them: each box as its two corners, labels 2 and 3."""
        import torch

        prompt = self.model.sam_prompt_encoder
        corners = boxes.reshape(-1, 2, 2)
        labels = torch.tensor([[2, 3]], dtype=torch.int, device=corners.device).repeat(len(corners), 1)
        sparse, dense = prompt(points=(corners, labels), boxes=None, masks=None)
        logits, scores, _, _ = self.model.sam_mask_decoder(
            image_embeddings=features["image_embed"][index:index + 1],
            image_pe=prompt.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=True,  # the image's one embedding for all its boxes
            high_res_features=[level[index:index + 1] for level in features["high_res_feats"]],
        )
        return logits, scores[:, 0]

    def _rles(self, logits, size) -> list[dict]:
        import torch.nn.functional as F

        step = int(self.params["masks_at_once"])
        masks = []
        for i in range(0, len(logits), step):
            # as SAM2Transforms.postprocess_masks does it (without its hole filling, which the predictor leaves off)
            full = F.interpolate(logits[i:i + step].float(), size, mode="bilinear", align_corners=False)
            # runs counted on the device; only they reach the host
            masks += rle.encode_tensors(full[:, 0] > self.mask_threshold)
        return masks


def normalise(batch):
    """B×S×S×3 uint8 -> B×3×S×S floats as ``SAM2Transforms`` makes them (ToTensor, then Normalize), on the
    batch's device."""
    import torch

    # NCHW in memory too: a channels-last input moves the encoder's results in the last bits
    x = batch.permute(0, 3, 1, 2).contiguous().float().div(255)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (SAM2_MEAN, SAM2_STD))
    return x.sub_(mean).div_(std)


SAM2_MEAN, SAM2_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SAM2Transforms' (ImageNet's, on the 0-1 scale)


def box_problem(box, width: int, height: int) -> str | None:
    """Why a box cannot prompt SAM2 (None when it can): not finite, empty, or outside the image."""
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box):
        return f"box {list(box)} is not finite"
    if x1 <= x0 or y1 <= y0:
        return f"box {list(box)} is empty"
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return f"box {list(box)} lies outside the {width}x{height} image"
    return None
