"""Where the driver's memory grows per committed chunk: the whole run, the commits' work taken out, Ray Data alone.

The driver benchmark's chain (``pipeline_efficiency.py --only driver``: four stand-in GPU stages at 1 ms per
image, shards of 4 small images, chunks of 2, 64 chunks in flight) on a local Ray. The driver's USS is sampled
every 20 commits, from a quarter of the way in (start-up does not count). Prints one table row:
part | shards | images per chunk | chunks | seconds | USS MB at a quarter | USS MB at the end | KB per chunk (fit, middle half) |
KB per chunk (rise from a quarter to the end).

  --part run        the real workflow (``pipeline.run``)
  --part no-commit  the same, each commit a task that only returns its marker (what the commits' own work costs)
  --part dataset    sculpt's dataset alone: the driver iterates the receipts and frees the gate, nothing else

    .venv/bin/python benchmarks/driver_memory.py --shards 300 --part run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH")] if p)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the driver benchmark's chain (a "benchmarks" package is installed too)
from pipeline_efficiency import DRIVER_CHUNKS, chain, job_config  # noqa: E402
from sculpt import config  # noqa: E402
from sculpt.outputs import units
from sculpt.engine import planning, dataset, progress
from sculpt.engine.job import annotate as run_job
from sculpt.testing import samples

EVERY = 20  # commits between samples


def marker_only(store, unit, job, parts, redo=False, error_budget=None) -> dict:
    """A commit that writes nothing: the marker a real one would return for a 2-image chunk."""
    return {"unit": unit, "images": 2, "rows": 2, "errors": 0, "input_bytes_read": 0, "end": {"last": True}}


def measure(part: str, shard_dir: str, out: str, chunk_images: int, overrides=()) -> list[tuple[int, float]]:
    cfg = job_config(shard_dir, out, chain(1, 0.001), [*DRIVER_CHUNKS, f"input.chunk_images={chunk_images}", *overrides])
    stages = [config.build_stage(s) for s in cfg.stages]
    me, points = psutil.Process(), []

    def sample(chunks: int) -> None:
        if chunks % EVERY == 0:
            points.append((chunks, me.memory_full_info().uss / 2**20))

    if part == "dataset":
        todo = planning.plan(cfg, stages)
        gate = dataset.start_gate(cfg)
        done = set()
        receipts_stream = dataset.build_dataset(todo.segments, stages, cfg, gate).iter_batches(
            batch_size=None, batch_format="pyarrow", prefetch_batches=0)
        for receipts in receipts_stream:
            for receipt in receipts.to_pylist():
                if receipt["unit_end"] and receipt["unit"] not in done:
                    done.add(receipt["unit"])
                    gate.release.remote(receipt["unit"])
                    sample(len(done))
        todo.lease.release()
        return points
    if part == "no-commit":
        units.commit_unit = marker_only  # the engine makes its commit task from units.commit_unit at run time
    unit = progress.Progress.unit

    def counted(self, marker, shard_done):
        unit(self, marker, shard_done)
        sample(self.chunks)

    progress.Progress.unit = counted
    with contextlib.redirect_stdout(sys.stderr):
        run_job(cfg, stages)
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=300)
    parser.add_argument("--part", choices=["run", "no-commit", "dataset"], default="run")
    parser.add_argument("--chunk-images", type=int, default=2, help="images per chunk (shards hold 4)")
    parser.add_argument("--set", action="append", default=[], help="a config override, e.g. input.readers=4")
    parser.add_argument("--series", action="store_true", help="also print every sample (chunks, USS MB)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="sculpt-driver-")
    shard_dir = os.path.join(work, "shards")
    samples.make_sample_shards(shard_dir, shards=args.shards, images_per_shard=4, scale=0.25)
    ray.init(num_cpus=32, num_gpus=4, include_dashboard=False, logging_level="ERROR", object_store_memory=2 << 30,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    start = time.monotonic()
    try:
        points = measure(args.part, shard_dir, os.path.join(work, "out"), args.chunk_images, args.set)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    if args.series:
        print(" ".join(f"{chunks}:{uss:.0f}" for chunks, uss in points))
    # the USS rises in steps (the allocator takes memory in arenas), so both the fitted slope over the middle
    # half and the rise from a quarter of the way to the end are shown
    middle = points[len(points) // 4: 3 * len(points) // 4 + 1]
    slope = np.polyfit([p[0] for p in middle], [p[1] for p in middle], 1)[0] * 1024
    (first, uss_first), (last, uss_last) = middle[0], points[-1]
    rise = (uss_last - uss_first) * 1024 / (last - first)
    print(f"| {args.part} | {args.shards} | {args.chunk_images} | {last} | {time.monotonic() - start:.0f} | "
          f"{uss_first:.0f} | {uss_last:.0f} | {slope:.1f} | {rise:.1f} |")


if __name__ == "__main__":
    main()
