"""Verify stage: EVF-SAM2 segments each object from its referring expression alone; the pair is kept when
IoU(EVF-SAM2 mask, SAM2 mask) >= ``threshold``. The IoU is recorded for every pair, kept or not."""

from __future__ import annotations

from sculpt import images, rle, schema, verify
from sculpt.stage import Stage


class Verifier(Stage):
    """Params (``model``, from the config's ``models.verify``, is an EVF-SAM2 hub id or checkpoint directory):

    - ``threshold`` (0.5): keep a pair when IoU >= threshold (the paper's 0.5)
    - ``prefix``: prepended to every expression; None: "[semantic] " for -multitask checkpoints, else ""
    - ``device``, ``dtype``: see ``sculpt.precision`` (None: bfloat16/float16 autocast on CUDA, float32 on CPU)
    """

    name = "verify"
    model_key = "verify"
    defaults = {"threshold": verify.DEFAULT_THRESHOLD, "prefix": None, "device": None, "dtype": None}

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        self.params["threshold"] = verify.check_threshold(self.params["threshold"])

    def setup(self) -> None:
        from sculpt.models import evf_sam2

        p = self.params
        self.model = evf_sam2.load(p["model"], device=p.get("device"), dtype=p.get("dtype"), prefix=p.get("prefix"))

    def process(self, rows: list[dict]) -> None:
        work = []  # (row, indices of its objects to verify)
        for row in rows:
            objects = row["objects"] or []
            todo, blank = verify.split(objects)
            for i in blank:
                verify.reject_blank(objects[i])
            if todo:
                work.append((row, todo))
        pictures = images.decode_on(self.model.device, [row["image_bytes"] for row, _ in work])  # together: nvJPEG
        for (row, todo), image in zip(work, pictures):
            objects = row["objects"]
            try:
                if isinstance(image, Exception):
                    raise image
                with self.device_turn:
                    masks = self.model.predict_tensor(image, [objects[i]["expression"] for i in todo])
                masks = rle.encode_tensors(masks)  # run lengths counted on the device; only they reach the host
            except Exception as exc:  # this image only; the batch's other images keep their results
                schema.mark_error(row, self.name, exc)
                continue
            for i, mask in zip(todo, masks):
                verify.judge(objects[i], mask, self.params["threshold"])
