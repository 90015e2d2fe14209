"""The offline checkpoint kit: seeded tiny checkpoints of every model, in their real formats.

``sculpt models tiny DIR`` writes one folder per model and ``DIR/models.yaml``, a job config that runs them on a
CPU as written (``--config DIR/models.yaml``): its `models` section points at them and the rest is ``CPU_SETTINGS``.
They run through exactly the code that loads and runs the real ones.

The two text models are briefly trained at kit time (seeded, a few seconds on one CPU thread) to act out one
fixed scene, whatever the image, so every object reaches every stage: the tiny InternVL answers the caption
prompt with ``CAPTION``, any refer prompt with ``EXPRESSION``, any group refer prompt with ``GROUP_EXPRESSION``,
any negative prompt with ``NEGATIVE``, any reasoning prompt with ``REASONING``, any chat prompt with ``CHAT`` and any
listener prompt with ``LISTENER_ANSWER``; the tiny Florence-2 grounds ``CAPTION`` (and each run of its sentences) to ``GROUNDING``'s boxes. The tiny SAM 3 is
trained too (a few seconds), to find every instance of each grounded kind, ``UNNAMED`` ones included, with
box-shaped masks. SAM2 and EVF-SAM2 keep random weights: their masks are meaningless.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import yaml

# The scene the trained tiny models act out. Every GROUNDING phrase occurs in CAPTION, in this order; boxes are
# Florence-2 location bins (x0, y0, x1, y1 in 0..999 of the image's width and height). The phrases cover every
# kind (sculpt.annotation.categories): "the wooden floor" is stuff, "its long tail" a part, "two green plants" one phrase
# grounded to two boxes (a group, multi), the rest single objects.
CAPTION = ("A gray cat sits on a red sofa on the wooden floor. Its long tail hangs down. "
           "Two green plants stand beside the window.")
EXPRESSION = "the gray cat on the red sofa"
# What the trained tiny InternVL answers to any group refer prompt (refer_prompt(..., member_boxes=...)) and to
# any negative prompt (negative_prompt(...)): one expression, so the chain makes one group expression per group
# and one negative per image.
GROUP_EXPRESSION = "the two green plants standing beside the window"
NEGATIVE = "a yellow umbrella leaning against the window"
# What the trained tiny InternVL answers to any reasoning prompt (reasoning_prompt(...)): in the scene the refer stage
# asks it about the group of the two plants (the one object whose plain pair passes the text checks), and it names
# them by use, none of their phrase's words or their looks (sculpt.annotation.reasoning.clean_reasoning keeps it).
REASONING = "the things people water so that they grow"
# What the trained tiny InternVL answers to any chat prompt (chat_prompt(...)): one turn whose answer marks the first
# listed object (sculpt.annotation.chat reads the mark back to that object).
CHAT = "Q: What do people water here?\nA: They water <ref>the plants</ref>[1] so that they grow."
GROUNDING = {
    "a gray cat": [(120, 310, 560, 810)],
    "a red sofa": [(30, 450, 970, 990)],
    "the wooden floor": [(0, 880, 999, 999)],
    "its long tail": [(480, 620, 600, 900)],
    "two green plants": [(600, 90, 740, 700), (790, 130, 950, 720)],
    "the window": [(480, 20, 990, 470)],
}
# Instances of the scene's kinds that the caption never names, which the tiny SAM 3 finds beside the named ones
# (sculpt.testing.tiny_sam3.scene_instances): a third plant, on the left. "two green plants" says how many, so their
# group is not completed with it (sculpt.annotation.instances): it is a rival of the group's expression.
UNNAMED = {"plant": [(20, 60, 280, 600)]}
# What the trained tiny InternVL answers to any listener prompt (listener_prompt(...)): the cat's box, in InternVL's
# 0..1000 convention. A pair of the cat would agree with it; the group of the two plants, the one pair of the scene
# that passes the text checks (every single object gets EXPRESSION: duplicates), disagrees (box IoU 0): the listener
# rejects it, before the mask checks.
LISTENER_BOX = (120, 310, 560, 810)
LISTENER_ANSWER = "[[" + ", ".join(map(str, LISTENER_BOX)) + "]]"

# `models` key -> the module whose write(directory, seed) writes that model's tiny checkpoint
WRITERS = {
    "vlm": "sculpt.testing.tiny_internvl",
    "ground": "sculpt.testing.tiny_florence2",
    "mask": "sculpt.testing.tiny_sam2",
    "verify": "sculpt.testing.tiny_evf_sam2",
    "instances": "sculpt.testing.tiny_sam3",
}


# The rest of DIR/models.yaml: what the tiny models need to run on a CPU. A new local Ray with logical CPUs and GPUs
# enough for the stages (readers 2 + caption 1 + ground 1 + mask 1 + instances 1 + refer 1 + listen 1 + verify 1 + chat
# 1 + the VLM engine 1 = 11 CPUs; the engine 1 + ground 0.25 + mask 0.25 + verify 0.5 = 2 GPUs, which tiny models use on the
# CPU; the tiny SAM 3 takes no GPU share), small
# images, short answers, no CUDA graphs, and 1 GiB of KV cache for vLLM's CPU backend (else it asks for most of the RAM;
# VLLM_CPU_KVCACHE_SPACE, where set, wins).
CPU_SETTINGS = {
    "ray": {"num_cpus": 11, "num_gpus": 2},
    "vlm": {"max_tiles": 2, "max_model_len": 4096, "enforce_eager": True,
            "engine_kwargs": {"kv_cache_memory_bytes": 1 << 30}},
    "stages": [{"name": "caption", "params": {"max_tokens": 48}},
               {"name": "ground", "params": {"max_new_tokens": 64, "num_beams": 1}},
               {"name": "mask"},
               {"name": "instances", "cpus": 1, "gpus": 0},
               {"name": "refer", "params": {"max_tokens": 24}},
               {"name": "listen", "params": {"max_tokens": 24}},
               {"name": "verify"},
               {"name": "chat", "actors": 1, "cpus": 1, "params": {"max_tokens": 48}}],
}


@contextlib.contextmanager
def one_thread():
    """Train the tiny models on one thread: tiny ops gain little from more and lose much on a busy machine
    (threads spinning on shared cores), and the trained weights then do not depend on the core count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def kit_version() -> str:
    """A hash of the code that writes and trains the kit (and of the prompts it learns): a kit written by other
    code is stale."""
    import hashlib

    from sculpt.annotation import prompts

    digest = hashlib.sha256()
    for module in [__name__, prompts.__name__, "sculpt.annotation.profiles", *WRITERS.values()]:
        with open(importlib.import_module(module).__file__, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


KIT_VERSION_FILE = "kit_version"


def written_version(directory: str) -> str | None:
    """The kit_version of the kit in ``directory`` (None: none there, or one older than versions)."""
    try:
        with open(os.path.join(directory, KIT_VERSION_FILE)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def write_tiny_models(directory: str, seed: int = 0) -> dict[str, str]:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a progress bar per tiny checkpoint says nothing
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for key, module in WRITERS.items():
        paths[key] = importlib.import_module(module).write(os.path.join(os.path.abspath(directory), key), seed)
    write_config(directory, paths)
    with open(os.path.join(directory, KIT_VERSION_FILE), "w") as f:
        f.write(kit_version())
    return paths


def write_config(directory: str, paths: dict[str, str]) -> str:
    """Write ``DIR/models.yaml``: a job config running the models at ``paths`` ({models key: directory}) on a CPU."""
    path = os.path.join(directory, "models.yaml")
    with open(path, "w") as f:
        f.write("# The tiny offline models on a CPU: --config this file (--set overrides it; sculpt/config.py)\n")
        yaml.safe_dump({"models": paths, **CPU_SETTINGS}, f, sort_keys=False)
    return path
