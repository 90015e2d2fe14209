"""Refer stage: one referring expression per object from the VLM pool (GSSculpt §3.3).

Every request about an image carries the same image first and the caption next; only the object's phrase and
box (in InternVL's 0..1000 convention) differ, at the end, so the engine's prefix cache serves all objects after
the first. A group is asked about with all its member boxes; an object whose kind has other instances in the image
(named, or found by the instances stage) is told where they are (``sculpt.annotation.instances.others``). Unusable output is an error on that object, not on
the image. Each image is also asked for negatives (expressions of something it does not show).
"""

from __future__ import annotations

from actors.vlm import VLMStage, image_key
from sculpt.annotation import instances, prompts, rle
from sculpt import schema
from sculpt.annotation.categories import NEGATIVE


class Referrer(VLMStage):
    """Params: ``max_tokens`` (48) per expression; ``negatives`` (1): expressions per image for something the image
    does not show (0: none), asked with the caption and the grounded phrases, each an object of category
    ``negative`` with an empty mask that the verify stage accepts only if its own mask is (nearly) empty."""

    name = "refer"
    defaults = {"max_tokens": 48, "negatives": 1, "prompts_version": prompts.PROMPTS_VERSION}

    def process(self, rows: list[dict]) -> None:
        encoded, requests, targets = {}, [], []  # targets: the object, or (row, present phrases) for negatives
        count = int(self.params["negatives"])
        for row in rows:
            objects = row["objects"] or []
            for i, obj in enumerate(objects):
                if obj.get("mask") is None or obj.get("error"):
                    continue
                encoded[image_key(row)] = row["image_bytes"]
                members = [objects[i]["box"] for i in obj.get("members") or []]
                text = prompts.refer_prompt(row["caption"], obj.get("phrase"), obj["box"], row["width"], row["height"],
                                            member_boxes=members, other_boxes=instances.others(objects, i),
                                            kind=instances.kind(obj.get("phrase")))
                requests.append((image_key(row), text))
                targets.append(obj)
            if count and row.get("caption"):
                encoded[image_key(row)] = row["image_bytes"]
                present = [obj["phrase"] for obj in objects if obj.get("phrase")]
                requests.append((image_key(row), prompts.negative_prompt(row["caption"], present, count)))
                targets.append((row, present))
        if not requests:
            return
        answers = self.ask(encoded, requests, max(self.params["max_tokens"], 24 * count))
        for target, answer in zip(targets, answers):
            if isinstance(target, tuple):
                row, present = target
                row["objects"] = (row["objects"] or []) + [
                    schema.new_object(expression=e, expression_words=len(e.split()), category=NEGATIVE,
                                      mask=rle.empty(row["height"], row["width"]), area=0)
                    for e in prompts.clean_negatives(answer["text"], count, present)]
                continue
            try:
                target["expression"] = prompts.clean_expression(answer["text"])
                target["expression_words"] = len(target["expression"].split())
            except ValueError as exc:
                target["error"] = f"{self.name}: {exc}"
