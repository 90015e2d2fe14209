"""VLM profiles: how each model family is asked about boxes and answers with them.

One ``Profile`` per family owns its box convention in and out, the wording of the box-bearing prompt pieces and
whether the engine tiles images (InternVL's dynamic tiling). ``sculpt.annotation.prompts`` keeps the one set of
prompts and asks the profile for the parts that carry boxes. Coordinates are given to the profile in pixels of the
image the stages see; ``input_size`` is (width, height) of the model's resized input, which only a profile that
answers in those pixels needs (Qwen2.5-VL: the caller computes it with the image processor's own resize rule).

| profile      | boxes in prompts and answers                                     | scale                  |
|--------------|------------------------------------------------------------------|------------------------|
| internvl     | ``<ref>phrase</ref><box>[[x0, y0, x1, y1]]</box>``                 | 0..1000 of each axis   |
| qwen2_vl     | ``<|object_ref_start|>phrase<|object_ref_end|><|box_start|>(x0,y0),(x1,y1)<|box_end|>`` | 0..1000 |
| qwen2_5_vl   | JSON ``{"bbox_2d": [x0, y0, x1, y1], "label": "phrase"}``          | pixels of the resized input |
| qwen3_vl     | JSON ``{"bbox_2d": [x0, y0, x1, y1], "label": "phrase"}``          | 0..1000 of each axis   |

Pure: no torch, no file reading (``sculpt.engine.vlm`` reads a checkpoint's config and calls ``profile_for``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_LIST4 = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")
_BBOX_2D = re.compile(r"[\"']?bbox_2d[\"']?\s*:\s*\[" + ",".join([_NUMBER] * 4) + r"\]")
_POINT_PAIR = re.compile(r"\(" + _NUMBER + "," + _NUMBER + r"\)\s*,?\s*\(" + _NUMBER + "," + _NUMBER + r"\)")


@dataclass(frozen=True)
class Profile:
    """A VLM family's conventions. ``version`` goes into the job fingerprint and markers with ``name``: change what a
    profile writes or reads, bump it."""

    name: str
    version: int
    model_types: tuple[str, ...]  # config.json model_type values of the family
    style: str  # "internvl" | "json" | "points": how boxes are written
    relative: bool  # True: 0..1000 of each axis; False: pixels of the model's resized input (input_size)
    listener: str  # the listener's question, with {expression}: the family's own grounding wording
    tiled: bool = False  # InternVL's dynamic tiling (vLLM's mm_processor_kwargs)

    @property
    def label(self) -> str:
        """What the fingerprint and markers record: name and version."""
        return f"{self.name}-{self.version}"

    # -- coordinates ------------------------------------------------------------------------------------------------

    def _range(self, input_size) -> tuple[float, float]:
        """The convention's width and height: 1000 each, or the model's resized input (input_size)."""
        if self.relative:
            return 1000.0, 1000.0
        if input_size is None:
            raise ValueError(f"profile {self.name}: boxes are in pixels of the model's resized input; give input_size")
        return float(input_size[0]), float(input_size[1])

    def coordinates(self, box, width: int, height: int, input_size=None) -> list[int]:
        """A pixel box (x0, y0, x1, y1) as the convention's integers, clamped to its range."""
        rx, ry = self._range(input_size)
        x0, y0, x1, y1 = box
        return [int(min(limit, max(0, round(v / size * limit)))) for v, size, limit in
                ((x0, width, rx), (y0, height, ry), (x1, width, rx), (y1, height, ry))]

    def _pixels(self, values, width: int, height: int, input_size) -> list[float] | None:
        """The convention's (x0, y0, x1, y1) as a pixel box: clamped, corners put right; None for no area."""
        rx, ry = self._range(input_size)
        x0, x1 = (min(rx, max(0.0, float(v))) for v in (values[0], values[2]))
        y0, y1 = (min(ry, max(0.0, float(v))) for v in (values[1], values[3]))
        x0, x1, y0, y1 = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
        if not (x1 > x0 and y1 > y0):
            return None
        return [x0 / rx * width, y0 / ry * height, x1 / rx * width, y1 / ry * height]

    # -- text -------------------------------------------------------------------------------------------------------

    def boxes_to_text(self, boxes, width: int, height: int, input_size=None) -> str:
        """One or more pixel boxes in the convention, as prompts carry them (without the phrase)."""
        coords = [self.coordinates(box, width, height, input_size) for box in boxes]
        if self.style == "internvl":
            return "[" + ", ".join("[" + ", ".join(map(str, c)) + "]" for c in coords) + "]"
        if self.style == "points":
            return "".join(f"<|box_start|>({c[0]},{c[1]}),({c[2]},{c[3]})<|box_end|>" for c in coords)
        items = [json.dumps({"bbox_2d": c}) for c in coords]
        return items[0] if len(items) == 1 else "[" + ", ".join(items) + "]"

    def box_to_text(self, box, width: int, height: int, input_size=None) -> str:
        return self.boxes_to_text([box], width, height, input_size)

    def region(self, phrase: str, boxes, width: int, height: int, input_size=None) -> str:
        """A named region in a prompt: the phrase and its box(es) in the family's own referring form."""
        text = self.boxes_to_text(boxes, width, height, input_size)
        if self.style == "internvl":
            return f"<ref>{phrase}</ref><box>{text}</box>"
        if self.style == "points":
            return f"<|object_ref_start|>{phrase}<|object_ref_end|>{text}"
        return f"{phrase} ({text})"

    def places(self, boxes, width: int, height: int, input_size=None) -> str:
        """Unnamed places in a prompt (the other instances of a kind)."""
        text = self.boxes_to_text(boxes, width, height, input_size)
        return f"<box>{text}</box>" if self.style == "internvl" else text

    def text_to_boxes(self, text: str, width: int, height: int, input_size=None) -> list[list[float]]:
        """The pixel boxes (x0, y0, x1, y1) of an answer in the convention, the inverse of ``boxes_to_text``: each
        coordinate clamped to the convention's range and scaled back; corners given the wrong way round are put
        right, a box of no area is dropped. An answer without one gives ``[]``."""
        text = text or ""
        if self.style == "points":
            found = [m.groups() for m in _POINT_PAIR.finditer(text)]
        elif self.style == "json":  # bbox_2d lists if the answer names any, else every list of four numbers
            found = [m.groups() for m in _BBOX_2D.finditer(text)] or [m.groups() for m in _LIST4.finditer(text)]
        else:
            found = [m.groups() for m in _LIST4.finditer(text)]
        boxes = [self._pixels(values, width, height, input_size) for values in found]
        return [box for box in boxes if box is not None]

    def listener_prompt(self, expression: str) -> str:
        return self.listener.format(expression=expression)


INTERNVL = Profile("internvl", 1, ("internvl", "internvl_chat"), "internvl", True,
                   "Please provide the bounding box coordinate of the region this sentence describes: "
                   "<ref>{expression}</ref>", tiled=True)
QWEN2_VL = Profile("qwen2_vl", 1, ("qwen2_vl",), "points", True,
                   "Find the bounding box of <|object_ref_start|>{expression}<|object_ref_end|>")
QWEN2_5_VL = Profile("qwen2_5_vl", 1, ("qwen2_5_vl",), "json", False,
                     'Locate "{expression}" in the image and report its bbox coordinates in JSON format.')
QWEN3_VL = Profile("qwen3_vl", 1, ("qwen3_vl", "qwen3_vl_moe"), "json", True,
                   'Locate "{expression}" in the image and report its bbox coordinates in JSON format.')

PROFILES = {p.name: p for p in (INTERNVL, QWEN2_VL, QWEN2_5_VL, QWEN3_VL)}
DEFAULT = INTERNVL
CHOICES = ("auto", *PROFILES)  # vlm.profile's values


def profile_for(model_config: dict | None, model: str = "") -> Profile:
    """The profile of a checkpoint, from its config.json (``model_type``, else its ``architectures``), else from
    the model id's name (an endpoint's served name, a Hub id not on this machine); InternVL when nothing says."""
    config = model_config or {}
    model_type = str(config.get("model_type") or "").lower()
    for profile in PROFILES.values():
        if model_type in profile.model_types:
            return profile
    names = " ".join(config.get("architectures") or []).lower() + " " + model.rsplit("/", 1)[-1].lower()
    squeezed = re.sub(r"[^a-z0-9]", "", names)
    for marker, profile in (("qwen3vl", QWEN3_VL), ("qwen25vl", QWEN2_5_VL), ("qwen2vl", QWEN2_VL)):
        if marker in squeezed:
            return profile
    return DEFAULT


def get(setting: str | None, model_config: dict | None = None, model: str = "") -> Profile:
    """``vlm.profile``'s profile: a name, or "auto" (None) for ``profile_for``."""
    if setting in (None, "auto"):
        return profile_for(model_config, model)
    try:
        return PROFILES[setting]
    except KeyError:
        raise ValueError(f"vlm.profile={setting!r}: one of {', '.join(CHOICES)}") from None
