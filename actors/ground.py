"""The ground stage: Florence-2 ``<CAPTION_TO_PHRASE_GROUNDING>`` turns each caption's phrases into boxes.

Runs transformers' native ``Florence2ForConditionalGeneration``. Images are decoded, resized and normalised on
the model's device (``sculpt.annotation.images.decode_on``, the processor's torchvision backend) and encoded once each;
captions longer than the encoder's text budget are split by sentence (sculpt.annotation.grounding) and every chunk is
generated against its image's encoding, up to ``prompts_per_call`` chunks together. The processor's own
``post_process_generation`` turns ``<loc_…>`` tokens into pixel boxes.
"""

from __future__ import annotations

import threading

from sculpt.annotation import categories, grounding, groups, images
from sculpt.models import precision
from sculpt import schema
from sculpt.stage import Stage


class Grounder(Stage):
    """Params (all optional; ``model`` comes from the config's ``models.ground``):

    - ``num_beams`` (3), ``max_new_tokens`` (1024): generation
    - ``max_caption_tokens``: cap on the prompt tokens of one caption chunk, below the encoder's own budget
      (positions minus image tokens); None uses that budget
    - ``prompts_per_call`` (16): caption chunks per ``generate`` call
    - ``min_box_size`` (1.0 px): narrower or lower boxes are dropped
    - ``duplicate_iou`` (0.9): of two boxes of one image overlapping this much, the later is dropped
    - ``categories`` (all four): the kinds of phrase kept, of stuff, part, single, multi (``sculpt.annotation.groups.categorise``);
      e.g. [single, multi] grounds no stuff and no parts
    - ``device``, ``dtype``: see ``sculpt.models.precision`` (None: bfloat16/float16 weights on CUDA, float32 on CPU)

    Why these settings: 3 beams is what Florence-2's authors run for grounding (their published examples and
    evaluation); greedy decoding costs about a third of the decoder time, unmeasured for quality, so it is a
    param, not the default. ``max_new_tokens`` is a bound, not a cost: generation stops at ``</s>``, and each box
    costs about nine tokens (four ``<loc_…>`` plus the phrase), so 1024 holds ~110 objects, more than a chunk of
    the ~450-token budget (Florence-2-large: 1024 positions - 577 image tokens) names. Chunks fill that budget:
    the image is encoded once whatever the chunk count, so a shorter chunk saves nothing and cuts more sentences
    from their context; ``prompts_per_call`` bounds the decoder's batch (beams x prompts sequences).
    """

    name = "ground"
    model_key = "ground"
    defaults = {"num_beams": 3, "max_new_tokens": 1024, "max_caption_tokens": None, "prompts_per_call": 16,
                "min_box_size": 1.0, "duplicate_iou": 0.9, "categories": list(categories.NAMES.values()),
                "device": None, "dtype": None}

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        unknown = set(self.params["categories"]) - set(categories.NAMES.values())
        if unknown:
            raise ValueError(f"stage {self.name}: unknown categories {sorted(unknown)}; known: {list(categories.NAMES.values())}")

    def setup(self) -> None:
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        self.device, dtype = precision.resolve(self.params["device"], self.params["dtype"])
        self.dtype = getattr(torch, dtype)
        self.processor = AutoProcessor.from_pretrained(self.params["model"])
        self._tokenizing = threading.Lock()
        self.model = Florence2ForConditionalGeneration.from_pretrained(self.params["model"], dtype=self.dtype)
        self.model.to(self.device).eval()
        # The encoder reads the image tokens and the prompt together; what is left is the prompt's budget.
        self.budget = self.model.config.text_config.max_position_embeddings - self.processor.num_image_tokens
        if self.params["max_caption_tokens"]:
            self.budget = min(self.budget, int(self.params["max_caption_tokens"]))

    def count_tokens(self, text: str) -> int:
        """Tokens of the whole prompt the processor builds around a caption chunk (with <s> and </s>)."""
        return len(self._tokenize([text])["input_ids"][0])

    def _tokenize(self, chunks: list[str], image_tokens: int = 0, **kwargs):
        """The processor's prompt layout (image tokens, <s>, task prompt, </s>) for caption chunks; the tokenizer
        keeps padding state between calls, so the actor's threads take turns."""
        tokenizer = self.processor.tokenizer
        texts = [self.processor.image_token * image_tokens + tokenizer.bos_token
                 + self.processor.task_prompts_with_input[grounding.TASK].format(input=chunk.strip()) + tokenizer.eos_token
                 for chunk in chunks]
        with self._tokenizing:
            return tokenizer(texts, add_special_tokens=False, **kwargs)

    def process(self, rows: list[dict]) -> None:
        work = []  # (row, image on the device, caption chunks)
        for row, image in zip(rows, images.decode_on(self.device, [row["image_bytes"] for row in rows])):
            try:
                if isinstance(image, Exception):
                    raise image
                chunks = grounding.split_caption(row.get("caption") or "", self.budget, self.count_tokens)
            except Exception as exc:
                schema.mark_error(row, self.name, exc)
                continue
            row["objects"] = row["objects"] or []
            if chunks:
                work.append((row, image, chunks))

        for group in grounding.pack(work, [len(chunks) for _, _, chunks in work], int(self.params["prompts_per_call"])):
            found: dict[int, list[dict]] = {id(row): [] for row, _, _ in group}
            for (row, image, _), chunk, parsed in self._generate(group):
                height, width = image.shape[:2]
                found[id(row)] += grounding.chunk_objects(
                    row["caption"], chunk, parsed["labels"], parsed["bboxes"], width, height,
                    min_box_size=float(self.params["min_box_size"]),
                )
            for row, _, _ in group:
                objects = grounding.drop_duplicates(found[id(row)], float(self.params["duplicate_iou"]))
                groups.categorise(objects)
                wanted = set(self.params["categories"])
                row["objects"] += [schema.new_object(**obj) for obj in objects if obj["category"] in wanted]
                row["grounded_caption"] = groups.grounded_caption(row["objects"])

    def _generate(self, group):
        """(image item, chunk, parsed phrases and boxes) for every caption chunk of the group's images."""
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        jobs = [(k, chunk) for k, (_, _, chunks) in enumerate(group) for chunk in chunks]
        step = int(self.params["prompts_per_call"])
        prompts = [self._tokenize([chunk.text for _, chunk in jobs[i:i + step]], self.processor.num_image_tokens,
                                  padding="longest", return_tensors="pt") for i in range(0, len(jobs), step)]
        generated = []
        with self.device_turn, torch.inference_mode():
            # resized and normalised where the image is; its encoding is shared by all of its caption chunks
            pixels = self.processor.image_processor(
                images=[image.permute(2, 0, 1) for _, image, _ in group], input_data_format="channels_first",
                device=self.device, return_tensors="pt",
            )["pixel_values"]
            features = self.model.get_image_features(pixels.to(self.device, self.dtype)).pooler_output
            for i, prompt in zip(range(0, len(jobs), step), prompts):
                index = torch.tensor([k for k, _ in jobs[i:i + step]], device=self.device)
                generated += list(self.model.generate(
                    input_ids=prompt["input_ids"].to(self.device),
                    attention_mask=prompt["attention_mask"].to(self.device),
                    mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=features[index])},
                    max_new_tokens=int(self.params["max_new_tokens"]),
                    num_beams=int(self.params["num_beams"]),
                    do_sample=False,
                ).cpu())
        out = []
        for (k, chunk), text in zip(jobs, self.processor.batch_decode(generated, skip_special_tokens=False)):
            image = group[k][1]
            parsed = self.processor.post_process_generation(
                text, task=grounding.TASK, image_size=(image.shape[1], image.shape[0]))[grounding.TASK]
            out.append((group[k], chunk, parsed))
        return out
