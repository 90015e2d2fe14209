"""Refer stage: one referring expression per object from the VLM pool (GSSculpt §3.3).

Every request about an image carries the same image first and the caption next; only the object's phrase and
box (in InternVL's 0..1000 convention) differ, at the end, so the engine's prefix cache serves all objects after
the first. Unusable output is an error on that object, not on the image.
"""

from __future__ import annotations

from actors.vlm import VLMStage, image_key
from sculpt import prompts


class Referrer(VLMStage):
    name = "refer"
    defaults = {"max_tokens": 48, "prompts_version": prompts.PROMPTS_VERSION}

    def process(self, rows: list[dict]) -> None:
        encoded, requests, targets = {}, [], []
        for row in rows:
            for obj in row["objects"] or []:
                if obj.get("mask") is None or obj.get("error"):
                    continue
                encoded[image_key(row)] = row["image_bytes"]
                text = prompts.refer_prompt(row["caption"], obj.get("phrase"), obj["box"], row["width"], row["height"])
                requests.append((image_key(row), text))
                targets.append(obj)
        if not requests:
            return
        for obj, answer in zip(targets, self.ask(encoded, requests, self.params["max_tokens"])):
            try:
                obj["expression"] = prompts.clean_expression(answer["text"])
                obj["expression_words"] = len(obj["expression"].split())
            except ValueError as exc:
                obj["error"] = f"{self.name}: {exc}"
