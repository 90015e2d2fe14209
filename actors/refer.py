"""Refer stage: one referring expression per object from the VLM pool (GSSculpt §3.3).

Every request about an image carries the same image first and the caption next; only the object's phrase and
box (in the VLM family's convention: its profile, ``sculpt.annotation.profiles``) differ, at the end, so the
engine's prefix cache serves all objects after the first. A group is asked about with all its member boxes; an object whose kind has other instances in the image
(named, or found by the instances stage) is told where they are (``sculpt.annotation.instances.others``). Unusable output is an error on that object, not on
the image. Each image is also asked for negatives (expressions of something it does not show), and then for
reasoning references to a few of its objects whose expressions pass the text checks (``sculpt.annotation.reasoning``).
"""

from __future__ import annotations

from actors.vlm import VLMStage, image_key
from sculpt.annotation import instances, prompts, reasoning, rle
from sculpt import schema
from sculpt.annotation.categories import NEGATIVE


class Referrer(VLMStage):
    """Params: ``max_tokens`` (48) per expression; ``negatives`` (1): expressions per image for something the image
    does not show (0: none), asked with the caption and the grounded phrases, each an object of category
    ``negative`` with an empty mask that the verify stage accepts only if its own mask is (nearly) empty;
    ``reasoning`` (2): reasoning references per image (0: none), asked once the plain expressions are in, about the
    largest objects whose plain pair passes the text checks, each an object of ``style`` reasoning naming its
    ``target`` (an answer that names how the object looks, or names it, is dropped: ``reasoning.clean_reasoning``)."""

    name = "refer"
    defaults = {"max_tokens": 48, "negatives": 1, "reasoning": reasoning.DEFAULT_COUNT,
                "prompts_version": prompts.PROMPTS_VERSION}

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
                                            kind=instances.kind(obj.get("phrase")),
                                            **self.boxes(row["width"], row["height"]))  # the VLM family's convention
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
                                      mask=rle.empty(row["height"], row["width"]), area=0, style=reasoning.PLAIN)
                    for e in prompts.clean_negatives(answer["text"], count, present)]
                continue
            try:
                target["expression"] = prompts.clean_expression(answer["text"])
                target["expression_words"] = len(target["expression"].split())
                target["style"] = reasoning.PLAIN
            except ValueError as exc:
                target["error"] = f"{self.name}: {exc}"
        if int(self.params["reasoning"]):
            self.reason(rows, encoded)

    def reason(self, rows: list[dict], encoded: dict) -> None:
        """Reasoning references to up to ``reasoning`` objects of each image, appended after its other objects."""
        requests, targets = [], []  # targets: (row, index of the object)
        for row in rows:
            objects = row["objects"] or []
            for i in reasoning.candidates(objects, int(self.params["reasoning"])):
                members = [objects[m]["box"] for m in objects[i].get("members") or []]
                requests.append((image_key(row), prompts.reasoning_prompt(
                    row["caption"], objects[i].get("phrase"), objects[i]["box"], row["width"], row["height"], members,
                    **self.boxes(row["width"], row["height"]))))
                targets.append((row, i))
        if not requests:
            return
        for (row, i), answer in zip(targets, self.ask(encoded, requests, self.params["max_tokens"])):
            try:
                expression = reasoning.clean_reasoning(answer["text"], row["objects"][i].get("phrase"))
            except ValueError:
                continue  # no usable reasoning reference to this object: it has its plain one
            row["objects"].append(schema.new_object(**reasoning.reasoning_fields(row["objects"], i, expression)))
