"""The mask stage: SAM2 turns each grounded box into a mask (``sam2`` package, ``SAM2ImagePredictor``).

Images are decoded on the model's device (``sculpt.annotation.images.decode_on``: nvJPEG on CUDA) and squashed there to
SAM2's square input. The images of a batch are embedded together (``images_at_once`` at a time, ``SAM2ImagePredictor.set_image_batch``);
all boxes of an image go to the mask decoder as one batched prompt. The decoder's
low-resolution logits are brought to the image's own resolution a few masks at a time and turned into COCO RLE
at once, so an image with many boxes never holds all its full-resolution float masks in memory. Thresholding and
the RLE run lengths happen on the model's device (``sculpt.annotation.rle.encode_tensors``); full masks never cross to the
host, pycocotools only compresses the runs.
"""

from __future__ import annotations

import glob
import math
import os

import numpy as np

from sculpt.annotation import groups, images, rle
from sculpt.models import precision
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

    - ``mask_threshold`` (0.0): logit threshold of SAM2's predictor
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
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.device, self.dtype = precision.resolve(self.params["device"], self.params["dtype"])
        model = build_sam2_model(self.params["model"], self.device)
        self.predictor = SAM2ImagePredictor(model, mask_threshold=float(self.params["mask_threshold"]))
        # predict() would bring every mask of the image to full resolution at once (N x H x W floats). It is made
        # to return the decoder's logits instead; _rles() runs the same post-processing a few masks at a time.
        transforms = self.predictor._transforms
        self._full_resolution = transforms.postprocess_masks
        transforms.postprocess_masks = lambda masks, orig_hw: masks

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

        side = self.predictor.model.image_size
        squashed, scaled, sizes = [], [], []
        for picture, image_boxes in zip(pictures, boxes):
            picture = torch.as_tensor(picture, device=self.device)
            height, width = picture.shape[:2]
            squashed.append(images.squash(picture, side).cpu().numpy())
            scaled.append(image_boxes * np.array([side / width, side / height] * 2, dtype=np.float32))
            sizes.append((height, width))
        with self.device_turn, torch.inference_mode(), precision.autocast(self.device, self.dtype):
            self.predictor.set_image_batch(squashed)  # the predictor holds the embeddings: one batch at a time
            logits, scores, _ = self.predictor.predict_batch(box_batch=scaled, multimask_output=False, return_logits=True)
        out = []
        for size, image_boxes, image_logits, image_scores in zip(sizes, boxes, logits, scores):
            n = len(image_boxes)  # the single-box case comes without its box axis
            out.append((self._rles(image_logits.reshape(n, 1, *image_logits.shape[-2:]), size),
                        image_scores.reshape(n, -1)[:, 0]))
        return out

    def _rles(self, logits: np.ndarray, size) -> list[dict]:
        import torch

        step = int(self.params["masks_at_once"])
        masks = []
        for i in range(0, len(logits), step):
            chunk = torch.from_numpy(logits[i:i + step]).to(self.device)
            full = self._full_resolution(chunk, size) > self.predictor.mask_threshold
            masks += rle.encode_tensors(full[:, 0])  # runs counted on the device; only they reach the host
        return masks


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
