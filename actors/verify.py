"""Verify stage: EVF-SAM2 segments each object from its referring expression alone, and ``sculpt.annotation.verify`` judges
the pair by one rule: text checks (length, repeating its phrase, another pair's same expression), the listener's box
(actors/listen.py), then the SAM2 mask and the image's other objects (agreement and ambiguity), or, for a negative,
nothing. The figures are recorded for every pair, kept or not, with the first check it failed (``reject_reason``)."""

from __future__ import annotations

from sculpt import errors, schema
from sculpt.annotation import images, rle, verify
from sculpt.stage import Stage


class Verifier(Stage):
    """Params (``model``, from the config's ``models.verify``, is an EVF-SAM2 hub id or checkpoint directory):

    - ``threshold`` (0.5): keep a pair when IoU >= threshold (the paper's 0.5) ...
    - ``reasoning_threshold`` (0.5): the threshold of reasoning pairs (``style`` reasoning, made by the refer stage):
      the same filter and margin judge them, and a reasoning pair is kept only when the object it names is
      (``unkept_target``)
    - ``margin`` (0.1): ... and its IoU beats the verifier mask's IoU with every other object of the image
      (``rival_iou``) by this much: a reference that fits another object nearly as well is ambiguous
    - ``listener_threshold`` (0.5): ... and the listener's box for its expression (``listener_iou``, set by the listen
      stage, actors/listen.py) overlaps the pair's box with IoU >= this; a pair the listener did not ask about passes
    - ``negative_area`` (0.01): keep a negative when the verifier's mask covers at most this share of the image
    - ``min_words`` (3), ``max_words`` (40): keep an expression of this many words (as written) only
    - ``duplicate_similarity`` (1.0): reject every pair of an image whose expression is near-same as another's:
      difflib's ratio over the words lower-cased, punctuation and articles dropped, at least this (1.0: equal)
    - ``semantic``: categories whose expressions get EVF-SAM2-multitask's "[semantic] " prefix (its semantic-level
      mode); None: stuff and part for a -multitask checkpoint, none for the others
    - ``prefix`` (""): prepended to every expression
    - ``keep_masks`` (false): store the verifier's own mask per pair (``verifier_mask``), to audit the filter
    - ``device``, ``dtype``: see ``sculpt.models.precision`` (None: bfloat16/float16 autocast on CUDA, float32 on CPU)
    """

    name = "verify"
    model_key = "verify"
    defaults = {"threshold": verify.DEFAULT_THRESHOLD, "margin": verify.DEFAULT_MARGIN,
                "reasoning_threshold": verify.DEFAULT_REASONING_THRESHOLD,
                "listener_threshold": verify.DEFAULT_LISTENER_THRESHOLD,
                "negative_area": verify.DEFAULT_NEGATIVE_AREA, "min_words": verify.DEFAULT_MIN_WORDS,
                "max_words": verify.DEFAULT_MAX_WORDS, "duplicate_similarity": verify.DEFAULT_DUPLICATE_SIMILARITY,
                "semantic": None, "prefix": "", "keep_masks": False,
                "device": None, "dtype": None}

    def __init__(self, *args, **params):
        super().__init__(*args, **params)
        p = self.params
        p["threshold"] = verify.check_threshold(p["threshold"])
        p["margin"] = verify.check_fraction("margin", p["margin"])
        p["reasoning_threshold"] = verify.check_fraction("reasoning_threshold", p["reasoning_threshold"])
        p["listener_threshold"] = verify.check_fraction("listener_threshold", p["listener_threshold"])
        p["negative_area"] = verify.check_fraction("negative_area", p["negative_area"])
        p["min_words"], p["max_words"] = verify.check_words(p["min_words"], p["max_words"])
        p["duplicate_similarity"] = verify.check_fraction("duplicate_similarity", p["duplicate_similarity"])
        if p["semantic"] is None:  # resolved here, so that the markers record what ran
            p["semantic"] = list(verify.SEMANTIC_CATEGORIES) if verify.is_multitask(p["model"]) else []

    def setup(self) -> None:
        from sculpt.models import evf_sam2

        p = self.params
        self.model = evf_sam2.load(p["model"], device=p.get("device"), dtype=p.get("dtype"), prefix=p.get("prefix") or "")

    def expression(self, obj: dict) -> str:
        semantic = obj.get("category") in self.params["semantic"]
        return (verify.SEMANTIC_PREFIX if semantic else "") + obj["expression"]

    def process(self, rows: list[dict]) -> None:
        work = []  # (row, indices of its objects to verify)
        for row in rows:
            objects = row["objects"] or []
            todo, blank = verify.split(objects)
            for i in blank:
                verify.reject_blank(objects[i])
            if todo:
                work.append((row, todo))
        pictures = images.decode_on(self.model.device, [row["image_bytes"] for row, _ in work])  # together: nvJPEG
        for (row, todo), image in zip(work, pictures):
            objects = row["objects"]
            try:
                if isinstance(image, Exception):
                    raise image
                with self.device_turn:
                    masks = self.model.predict_tensor(image, [self.expression(objects[i]) for i in todo])
                masks = rle.encode_tensors(masks)  # run lengths counted on the device; only they reach the host
            except Exception as exc:  # this image only; the batch's other images keep their results
                if errors.is_transient(exc):
                    raise  # an out-of-memory error says nothing about the image: the batch is tried again
                schema.mark_error(row, self.name, exc)
                continue
            for i, mask in zip(todo, masks):
                verify.judge(objects, i, mask, self.params)
                if self.params["keep_masks"]:
                    objects[i]["verifier_mask"] = mask
