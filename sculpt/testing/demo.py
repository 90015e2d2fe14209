"""The demo: ``sculpt run`` (or ``workflows/annotate.py``) with no input runs the chain on sample shards made from
scikit-image's photographs with the tiny offline models, on the CPU, its output in sculpt-demo/out. ``--demo
--input DIR`` runs the same on your own input (a folder of images, tars, Parquet files), its output in
sculpt-demo/out-<name of DIR>."""

from __future__ import annotations

import os
import shutil

DEMO_DIR = "sculpt-demo"


def prepare(inputs: list[str] | None = None) -> tuple[str, list[str]]:
    """Sample shards and tiny models under sculpt-demo/ (made once): the job config the tiny kit writes, which runs
    them on a CPU as it is, and the overrides that name the demo's input and output (``inputs``: the user's own,
    no sample shards)."""
    from sculpt.testing.kit import kit_version, write_tiny_models, written_version
    from sculpt.testing.samples import make_sample_shards

    shard_dir, model_dir = os.path.join(DEMO_DIR, "shards"), os.path.join(DEMO_DIR, "models")
    if not inputs and not os.path.isdir(shard_dir):
        make_sample_shards(shard_dir, shards=2, images_per_shard=6)
    if written_version(model_dir) != kit_version():  # none yet, or written by older code
        write_tiny_models(model_dir)
        shutil.rmtree(os.path.join(DEMO_DIR, "out"), ignore_errors=True)  # the old models' output: not resumed
    print("[sculpt] demo: tiny models on the CPU — the text models act out one trained scene and the mask models "
          "are random, so the demo shows the machinery, not annotation quality. The real models on a GPU cluster: ray job submit "
          "--address http://127.0.0.1:8265 --working-dir . -- python workflows/annotate.py --config job.yaml (a copy of "
          "workflows/annotate.yaml with your buckets; README: On a GPU cluster)", flush=True)
    if inputs:  # the input is given by --input; an output of its own, beside the sample shards' one
        first = inputs[0].rstrip("/")
        name = first.rsplit("/", 1)[-1] if "://" in first else os.path.basename(os.path.abspath(first))
        return os.path.join(model_dir, "models.yaml"), [f"output.path={os.path.join(DEMO_DIR, 'out-' + name)}"]
    return os.path.join(model_dir, "models.yaml"), [f"input.shards=[{shard_dir}]", f"output.path={os.path.join(DEMO_DIR, 'out')}"]
