"""Listen stage: a second opinion on each expression from the VLM pool, before the verify stage judges it.

The listener is asked where the expression's region is, from the image and the expression alone (no caption, no
target box), in the VLM family's own grounding form (its profile, ``sculpt.annotation.profiles``: InternVL's is
``prompts.LISTENER_PROMPT``); the box it answers, read in the family's convention, is compared with the pair's box
(``listener_iou``), and the verify stage's keep rule rejects a pair whose listener looked elsewhere
(``reject_reason`` ``listener``). One short request per pair, image first, through the same engine pool as caption
and refer: each image's requests go to the replica whose prefix cache holds the image already.
"""

from __future__ import annotations

from actors.vlm import VLMStage, image_key
from sculpt.annotation import prompts, verify


class Listener(VLMStage):
    """Asks about every pair the keep rule has not rejected by its text checks (``verify.listened``: not negatives,
    not pairs with an error, a blank expression, one that repeats its phrase or another pair's); the others keep a
    null ``listener_iou``, as do all pairs of a job without this stage (the verify stage's listener check then passes).

    Params: ``max_tokens`` (96) per answer, enough for a box after an echo of a 40-word expression (the answer ends
    at the model's end of turn, usually ~20 tokens). An answer without a box scores 0 (found nothing there)."""

    name = "listen"
    defaults = {"max_tokens": 96, "prompts_version": prompts.PROMPTS_VERSION}

    def process(self, rows: list[dict]) -> None:
        encoded, requests, targets = {}, [], []  # targets: (row, object) of each request
        for row in rows:
            objects = row["objects"] or []
            for i, obj in enumerate(objects):
                if verify.listened(objects, i):
                    encoded[image_key(row)] = row["image_bytes"]
                    requests.append((image_key(row), prompts.listener_prompt(
                        obj["expression"], self.boxes(row["width"], row["height"])["profile"])))
                    targets.append((row, obj))
        if not requests:
            return
        for (row, obj), answer in zip(targets, self.ask(encoded, requests, self.params["max_tokens"])):
            boxes = prompts.text_to_boxes(answer["text"], row["width"], row["height"],
                                          **self.boxes(row["width"], row["height"]))
            obj["listener_iou"] = verify.listener_iou(boxes, obj["box"])
