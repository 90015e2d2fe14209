"""Verify stage: EVF-SAM2 segments each object from its referring expression alone; the pair is kept when
IoU(EVF-SAM2 mask, SAM2 mask) >= ``threshold``. The IoU is recorded for every pair, kept or not."""

from __future__ import annotations

from sculpt import images, rle, schema, verify
from sculpt.stage import Resources, Stage

PARAMS = {
    "model": "EVF-SAM2 hub id or local checkpoint directory",
    "threshold": "keep a pair when IoU >= threshold (paper: 0.5)",
    "prefix": 'prepended to every expression; null: "[semantic] " for -multitask checkpoints, else ""',
    "device": 'torch device; null: "cuda" when available, else "cpu"',
    "dtype": "torch dtype name; null: float16 on CUDA (as the reference demo), float32 on CPU",
}


class Verifier(Stage):
    name = "verify"

    def __init__(self, resources: Resources = Resources(), batch_size: int = 8, **params):
        unknown = set(params) - set(PARAMS)
        if unknown:
            raise ValueError(f"verify: unknown param(s) {sorted(unknown)}; known: {sorted(PARAMS)}")
        params = {"model": verify.DEFAULT_MODEL, "threshold": verify.DEFAULT_THRESHOLD, **params}
        params["threshold"] = verify.check_threshold(params["threshold"])
        super().__init__(resources, batch_size, **params)

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
                masks = self.model.predict(image, [objects[i]["expression"] for i in todo])
            except Exception as exc:  # this image only; the batch's other images keep their results
                schema.mark_error(row, self.name, exc)
                continue
            for i, mask in zip(todo, rle.encode_many(masks)):
                verify.judge(objects[i], mask, self.params["threshold"])
