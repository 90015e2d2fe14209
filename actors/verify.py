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
        for row in rows:
            objects = row["objects"] or []
            todo, blank = verify.split(objects)
            for i in blank:
                verify.reject_blank(objects[i])
            if not todo:
                continue
            try:
                image = images.load_rgb(row["image_bytes"])
                # the masks stay on the model's device; only their run lengths reach the host
                masks = rle.encode_tensors(self.model.predict_tensor(image, [objects[i]["expression"] for i in todo]))
            except Exception as exc:  # this image only; the batch's other images keep their results
                schema.mark_error(row, self.name, exc)
                continue
            for i, mask in zip(todo, masks):
                verify.judge(objects[i], mask, self.params["threshold"])
