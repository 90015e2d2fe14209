"""The instances stage: SAM 3 (promptable concept segmentation, transformers' ``Sam3Model``) finds every instance of
each kind the image's objects name, so that the verifier's rivals, a group's members and the refer prompt know the
instances the caption missed (``sculpt.annotation.instances`` decides what they are).

Per image: the image is encoded once (``get_vision_features``), then its kinds ("plant", "cat"; up to
``kinds_at_once`` at a time) go to the detector and mask heads as one batch of text prompts over that one
encoding. The processor's ``post_process_instance_segmentation`` keeps the instances scoring above ``score`` and
brings their masks to the image's size; the masks are thresholded and run-length counted on the device
(``sculpt.annotation.rle.encode_tensors``).
"""

from __future__ import annotations

from sculpt import errors, schema
from sculpt.annotation import images, instances, rle
from sculpt.models import precision
from sculpt.stage import Stage


class InstanceFinder(Stage):
    """Adds the instances the caption missed as objects and ``instances`` (how many of its kind) to each object.

    Params (``model``, from the config's ``models.instances``, is a SAM 3 hub id such as facebook/sam3 or a local
    directory in its layout):

    - ``score`` (0.5): keep an instance whose score (query x presence, as the processor gives it) is above this
    - ``match_iou`` (0.5): an instance is a named object of its kind when mask IoU or box IoU reach this
    - ``complete_groups`` (true): a group whose phrase gives no count gains the found instances of its kind
    - ``mask_threshold`` (0.5): on the mask probabilities (the processor's default)
    - ``kinds_at_once`` (16): text prompts decoded together over one image encoding
    - ``device``, ``dtype``: see ``sculpt.models.precision`` (weights loaded in the dtype, as for Florence-2)
    """

    name = "instances"
    model_key = "instances"
    defaults = {"score": instances.DEFAULT_SCORE, "match_iou": instances.MATCH_IOU, "complete_groups": True,
                "mask_threshold": 0.5, "kinds_at_once": 16, "device": None, "dtype": None}

    def setup(self) -> None:
        import torch
        from transformers import Sam3Model, Sam3Processor

        self.device, dtype = precision.resolve(self.params["device"], self.params["dtype"])
        self.dtype = getattr(torch, dtype)
        self.processor = Sam3Processor.from_pretrained(self.params["model"])
        self.model = Sam3Model.from_pretrained(self.params["model"], dtype=self.dtype).to(self.device).eval()

    def process(self, rows: list[dict]) -> None:
        asked = {id(row): instances.kinds(row["objects"] or []) for row in rows}
        rows = [row for row in rows if asked[id(row)]]
        for row, image in zip(rows, images.decode_on(self.device, [row["image_bytes"] for row in rows])):
            try:
                if isinstance(image, Exception):
                    raise image
                found = self.find(image, list(asked[id(row)]))
            except Exception as exc:  # this image only; the batch's other images keep their results
                if errors.is_transient(exc):
                    raise  # an out-of-memory error says nothing about the image: the batch is tried again
                schema.mark_error(row, self.name, exc)
                continue
            for kind, kind_found in found.items():
                new = instances.add_instances(row["objects"], kind, kind_found, self.params)
                row["objects"] += [schema.new_object(**fields) for fields in new]

    def find(self, image, kinds: list[str]) -> dict[str, list[dict]]:
        """{kind: [{box (pixels), mask (RLE), score}]} of one image (an H×W×3 uint8 tensor on the device)."""
        import torch
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        size = tuple(image.shape[:2])
        pixels = self.processor(images=[image.permute(2, 0, 1)], return_tensors="pt")["pixel_values"]
        out: dict[str, list[dict]] = {}
        with self.device_turn, torch.inference_mode():
            encoded = self.model.get_vision_features(pixel_values=pixels.to(self.device, self.dtype))
            step = int(self.params["kinds_at_once"])
            for start in range(0, len(kinds), step):
                chunk = kinds[start:start + step]
                text = self.processor(text=chunk, return_tensors="pt").to(self.device)
                vision = Sam3VisionEncoderOutput(  # the one encoding, seen by every prompt of the chunk
                    fpn_hidden_states=tuple(h.expand(len(chunk), -1, -1, -1) for h in encoded.fpn_hidden_states),
                    fpn_position_encoding=tuple(h.expand(len(chunk), -1, -1, -1) for h in encoded.fpn_position_encoding))
                result = self.model(vision_embeds=vision, input_ids=text["input_ids"], attention_mask=text["attention_mask"])
                result.pred_masks, result.pred_boxes = result.pred_masks.float(), result.pred_boxes.float()
                result.pred_logits, result.presence_logits = result.pred_logits.float(), result.presence_logits.float()
                found = self.processor.post_process_instance_segmentation(
                    result, threshold=float(self.params["score"]), mask_threshold=float(self.params["mask_threshold"]),
                    target_sizes=[size] * len(chunk))
                for kind, kind_found in zip(chunk, found):
                    masks = rle.encode_tensors(kind_found["masks"].bool()) if len(kind_found["masks"]) else []
                    boxes = [[min(max(v, 0.0), limit) for v, limit in zip(box, size[::-1] * 2)]  # inside the image
                             for box in kind_found["boxes"].tolist()]
                    out[kind] = [{"box": box, "mask": mask, "score": score}
                                 for box, mask, score in zip(boxes, masks, kind_found["scores"].tolist())]
        return out
