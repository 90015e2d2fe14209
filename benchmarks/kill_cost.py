"""Model work a kill loses, against chunk size: the driver is SIGKILLed mid-run and the images a model stage had
finished but no committed chunk holds are counted.

The real workflow (``workflows/annotate.py`` as a subprocess: local Ray, one logical GPU) runs one stand-in
model stage (``tests.doubles:HoldGpu``, a fixed service time per image, logging every image it finishes) over
local sample shards. Once half of the images are worked on, the driver's process group is killed. Lost work =
images the stage finished minus images in chunks committed by then. Then the same command resumes, and the
output is checked: every image exactly once.

    .venv/bin/python benchmarks/kill_cost.py [--shards 4 --images 60 --seconds 0.05 --chunks 5,20,60] [--gzip]

``--gzip`` compresses the shards: each is then read in order by one reader task, as a shard on S3 is.
``--block-bytes`` sets ``ray.block_bytes``: the small sample images make chunks of a few KB, where SA-1B's
chunks (1,000 images, ~600 MB) span many blocks; a few KB per block puts the samples in that regime.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH")] if p)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pyarrow.dataset as pads  # noqa: E402

from sculpt.testing import samples  # noqa: E402
from sculpt.outputs.store import OutputStore  # noqa: E402


def worked(log_dir: str) -> set[str]:
    return {line for path in glob.glob(os.path.join(log_dir, "*.txt")) for line in open(path).read().split()}


def case(shard_dir: str, work: str, chunk: int, seconds: float, total: int, readers: int, kill_at: int,
         extra: list[str]) -> dict:
    out, logs = os.path.join(work, f"out-{chunk}"), os.path.join(work, f"logs-{chunk}")
    os.makedirs(logs)
    stage = {"name": "model", "class": "tests.doubles:HoldGpu", "gpus": 1, "batch_size": 4,
             "params": {"seconds_per_image": seconds, "work_log": logs}}
    args = [sys.executable, os.path.join(ROOT, "workflows", "annotate.py"), "--input", shard_dir, "--output", out,
            "--set", f"stages={json.dumps([stage])}", "--set", f"input.chunk_images={chunk}",
            "--set", f"input.readers={readers}", "--set", "input.batch_images=4", "--set", "ray.num_cpus=4",
            "--set", "ray.num_gpus=1", *extra]
    driver = subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(worked(logs)) < kill_at and driver.poll() is None:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done = worked(logs)
    markers = OutputStore(out).markers()
    committed = sum(m["images"] for m in markers)
    lost = len(done) - committed
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    rows = pads.dataset(out, format="parquet").to_table(columns=["shard", "index"]).to_pylist()
    exact = len(rows) == total and len({(r["shard"], r["index"]) for r in rows}) == total
    return {"chunk": chunk, "worked": len(done), "committed": committed, "chunks": len(markers), "lost": lost,
            "exact": exact and resumed.returncode == 0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--images", type=int, default=60, help="images per shard")
    parser.add_argument("--seconds", type=float, default=0.05, help="the stand-in stage's service time per image")
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--chunks", default="5,10,20,40", help="chunk sizes (input.chunk_images) to compare")
    parser.add_argument("--gzip", action="store_true", help="compressed shards (.tar.gz), each read in order")
    parser.add_argument("--block-bytes", type=int, help="ray.block_bytes (default: sculpt's)")
    parser.add_argument("--kill-at", type=float, default=0.5, help="kill once this share of the images is worked on")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="sculpt-kill-")
    try:
        shard_dir = os.path.join(work, "in")
        samples.make_sample_shards(shard_dir, shards=args.shards, images_per_shard=args.images, scale=0.25,
                                   compressed=args.gzip)
        total = args.shards * args.images
        kill_at = int(args.kill_at * total)
        print(f"{args.shards} {'compressed ' if args.gzip else ''}shards x {args.images} images, {args.seconds} s per image, "
              f"{args.readers} readers, blocks of {args.block_bytes or 'default'} bytes, "
              f"killed once {kill_at} images are worked on")
        print("| chunk images | worked on at the kill | in committed chunks | chunks committed | model work lost (images) "
              "| lost / chunk | resume exact |")
        print("|---|---|---|---|---|---|---|")
        extra = ["--set", f"ray.block_bytes={args.block_bytes}"] if args.block_bytes else []
        for chunk in (int(c) for c in args.chunks.split(",")):
            r = case(shard_dir, work, chunk, args.seconds, total, args.readers, kill_at, extra)
            print(f"| {chunk} | {r['worked']} | {r['committed']} | {r['chunks']} | {r['lost']} | "
                  f"{r['lost'] / chunk:.2f} | {'yes' if r['exact'] else 'NO'} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
