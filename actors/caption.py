"""Caption stage: one detailed global caption per image from the VLM pool (GSSculpt §3.1)."""

from __future__ import annotations

from actors.vlm import VLMStage, image_key
from sculpt.annotation import prompts
from sculpt import schema


class Captioner(VLMStage):
    name = "caption"
    defaults = {"max_tokens": 512, "prompts_version": prompts.PROMPTS_VERSION}

    def process(self, rows: list[dict]) -> None:
        encoded = {image_key(row): row["image_bytes"] for row in rows}
        answers = self.ask(encoded, [(image_key(row), prompts.CAPTION_PROMPT) for row in rows], self.params["max_tokens"])
        for row, answer in zip(rows, answers):
            caption = prompts.clean_caption(answer["text"], truncated=answer["finish_reason"] == "length")
            if caption:
                row["caption"] = caption
            else:
                schema.mark_error(row, self.name, f"empty caption (raw output {answer['text'][:80]!r})")
