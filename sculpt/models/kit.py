"""The offline checkpoint kit: seeded tiny random-weight checkpoints of every model, in their real formats.

``sculpt models tiny DIR`` writes one folder per model and ``DIR/models.yaml``, a config fragment that points
the job's `models` section at them. Real weights give real annotations; these give meaningless text and masks,
through exactly the code that loads and runs the real ones.
"""

from __future__ import annotations

import importlib
import os

import yaml

# `models` key -> the module whose write(directory, seed) writes that model's tiny checkpoint
WRITERS = {
    "vlm": "sculpt.models.tiny_internvl",
    "ground": "sculpt.models.tiny_florence2",
    "mask": "sculpt.models.tiny_sam2",
    "verify": "sculpt.models.tiny_evf_sam2",
}


def write_tiny_models(directory: str, seed: int = 0) -> dict[str, str]:
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for key, module in WRITERS.items():
        paths[key] = importlib.import_module(module).write(os.path.join(os.path.abspath(directory), key), seed)
    with open(os.path.join(directory, "models.yaml"), "w") as f:
        yaml.safe_dump({"models": paths}, f)
    return paths
