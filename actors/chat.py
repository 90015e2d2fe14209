"""Chat stage: grounded question-and-answer turns per image from the VLM pool, after the verify stage (issue 30).

One request per image that has kept objects: image first, then the caption (the prefix every request about the image
shares, so the engine's prefix cache serves it), then the kept objects as a numbered list (``prompts.chat_prompt``).
``sculpt.annotation.chat`` maps each mark of an answer to its object and drops turns that name no listed object.
"""

from __future__ import annotations

from actors.vlm import VLMStage, image_key
from sculpt.annotation import chat, prompts


class Chatter(VLMStage):
    """Params: ``turns`` (2): question-and-answer turns asked per image (0: none; fewer are kept when the answer
    holds fewer usable ones); ``max_tokens`` (256) per answer. An image without kept objects, or without a caption,
    is not asked (``chat`` null); one whose answer gave no usable turn has ``chat`` empty."""

    name = "chat"
    defaults = {"max_tokens": 256, "turns": chat.DEFAULT_TURNS, "prompts_version": prompts.PROMPTS_VERSION}

    def process(self, rows: list[dict]) -> None:
        count = int(self.params["turns"])
        encoded, requests, targets = {}, [], []  # targets: (row, listed objects)
        for row in rows:
            objects = row["objects"] or []
            listed = chat.listed(objects)
            if not count or not listed or not row.get("caption"):
                continue
            members = [[objects[m]["box"] for m in objects[i].get("members") or []] or [objects[i]["box"]]
                       for i in listed]
            encoded[image_key(row)] = row["image_bytes"]
            requests.append((image_key(row), prompts.chat_prompt(
                row["caption"], [(objects[i].get("phrase"), boxes) for i, boxes in zip(listed, members)], count,
                row["width"], row["height"], **self.boxes(row["width"], row["height"]))))
            targets.append((row, listed))
        if not requests:
            return
        for (row, listed), answer in zip(targets, self.ask(encoded, requests, self.params["max_tokens"])):
            row["chat"] = chat.parse_turns(answer["text"], listed, count)
