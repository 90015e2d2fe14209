"""The ground stage: Florence-2 ``<CAPTION_TO_PHRASE_GROUNDING>`` turns each caption's phrases into boxes.

Runs transformers' native ``Florence2ForConditionalGeneration``. Captions longer than the encoder's text budget
are split by sentence (sculpt.grounding), all chunks of all images of a batch are generated together, and the
processor's own ``post_process_generation`` turns ``<loc_…>`` tokens into pixel boxes.
"""

from __future__ import annotations

from sculpt import grounding, images, precision, schema
from sculpt.stage import Stage

OBJECT_FIELDS = [field.name for field in schema.OBJECT_TYPE]


class Grounder(Stage):
    """Params (all optional; ``model`` comes from the config's ``models.ground``):

    - ``num_beams`` (3), ``max_new_tokens`` (1024): generation
    - ``max_caption_tokens``: cap on the prompt tokens of one caption chunk, below the encoder's own budget
      (positions minus image tokens); None uses that budget
    - ``prompts_per_call`` (16): caption chunks per ``generate`` call
    - ``min_box_size`` (1.0 px): narrower or lower boxes are dropped
    - ``duplicate_iou`` (0.9): of two boxes of one image overlapping this much, the later is dropped
    - ``device``, ``dtype``: see ``sculpt.precision`` (None: bfloat16/float16 weights on CUDA, float32 on CPU)
    """

    name = "ground"
    model_key = "ground"
    defaults = {"num_beams": 3, "max_new_tokens": 1024, "max_caption_tokens": None, "prompts_per_call": 16,
                "min_box_size": 1.0, "duplicate_iou": 0.9, "device": None, "dtype": None}

    def setup(self) -> None:
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        self.device, dtype = precision.resolve(self.params["device"], self.params["dtype"])
        self.dtype = getattr(torch, dtype)
        self.processor = AutoProcessor.from_pretrained(self.params["model"])
        self.model = Florence2ForConditionalGeneration.from_pretrained(self.params["model"], dtype=self.dtype)
        self.model.to(self.device).eval()
        # The encoder reads the image tokens and the prompt together; what is left is the prompt's budget.
        self.budget = self.model.config.text_config.max_position_embeddings - self.processor.num_image_tokens
        if self.params["max_caption_tokens"]:
            self.budget = min(self.budget, int(self.params["max_caption_tokens"]))

    def count_tokens(self, text: str) -> int:
        """Tokens of the whole prompt the processor builds around a caption chunk (with <s> and </s>)."""
        tokenizer = self.processor.tokenizer
        prompt = self.processor.task_prompts_with_input[grounding.TASK].format(input=text.strip())
        return len(tokenizer(tokenizer.bos_token + prompt + tokenizer.eos_token, add_special_tokens=False)["input_ids"])

    def process(self, rows: list[dict]) -> None:
        jobs = []  # (row, image, chunk)
        found: dict[int, list[dict]] = {}
        for row in rows:
            try:
                image = images.load_rgb(row["image_bytes"])
                chunks = grounding.split_caption(row.get("caption") or "", self.budget, self.count_tokens)
            except Exception as exc:
                schema.mark_error(row, self.name, exc)
                continue
            found[id(row)] = []
            jobs += [(row, image, chunk) for chunk in chunks]

        step = int(self.params["prompts_per_call"])
        for i in range(0, len(jobs), step):
            batch = jobs[i:i + step]
            for (row, image, chunk), parsed in zip(batch, self._generate(batch)):
                height, width = image.shape[:2]
                found[id(row)] += grounding.chunk_objects(
                    row["caption"], chunk, parsed["labels"], parsed["bboxes"], width, height,
                    min_box_size=float(self.params["min_box_size"]),
                )

        for row in rows:
            if id(row) not in found:
                continue
            objects = grounding.drop_duplicates(found[id(row)], float(self.params["duplicate_iou"]))
            row["objects"] = (row["objects"] or []) + [{**dict.fromkeys(OBJECT_FIELDS), **obj} for obj in objects]

    def _generate(self, batch) -> list[dict]:
        import torch

        inputs = self.processor(
            text=[grounding.TASK + chunk.text for _, _, chunk in batch],
            images=[image for _, image, _ in batch],
            input_data_format="channels_last",  # never guessed: a 1- or 3-pixel-high image looks channels-first
            padding="longest",
            return_tensors="pt",
        ).to(self.device, self.dtype)
        with torch.inference_mode():
            generated = self.model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"],
                max_new_tokens=int(self.params["max_new_tokens"]),
                num_beams=int(self.params["num_beams"]),
                do_sample=False,
            )
        texts = self.processor.batch_decode(generated, skip_special_tokens=False)
        return [
            self.processor.post_process_generation(
                text, task=grounding.TASK, image_size=(image.shape[1], image.shape[0])
            )[grounding.TASK]
            for text, (_, image, _) in zip(texts, batch)
        ]
