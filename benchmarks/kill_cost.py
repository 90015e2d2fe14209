"""Model work a kill loses, against chunk size: the driver is SIGKILLed mid-run and the images a model stage had
finished but no committed chunk holds are counted.

The real workflow (``workflows/annotate.py`` in a subprocess, through ``benchmarks/kill_cost_job.py``: local Ray,
one logical GPU) runs one stand-in model stage (``tests.doubles:HoldGpu``, a fixed service time per image, logging
every image it finishes) over local sample shards. Once half of the images are worked on, the driver's process
group is killed. Lost work = images the stage finished minus images in chunks committed by then. Then the same
command resumes, and the output is checked: every image exactly once.

    .venv/bin/python benchmarks/kill_cost.py [--shards 4 --images 60 --seconds 0.05 --chunks 5,20,60] [--gzip]

``--gzip`` compresses the shards: each is then read in order by one reader task, as a shard on S3 is.
``--block-bytes`` sets ``ray.block_bytes``: the small sample images make chunks of a few KB, where SA-1B's
chunks (1,000 images, ~600 MB) span many blocks; a few KB per block puts the samples in that regime.

The job runs through ``benchmarks/kill_cost_job.py``, which traces the chunk gate's peak (chunks read and not
yet committed) to a file, so that a killed run still tells it. ``--no-gate`` passes readers through the gate
without waiting (the count is still kept): what Ray Data alone bounds. ``--ray-limits JSON`` sets Ray Data's own
limits on the driver's DataContext (keys in ``kill_cost_job.py``; ``object_store_chunks`` N is turned into
``object_store_memory`` = N chunks' bytes of the shards read). ``--full`` first runs each case uninterrupted:
its run time (sculpt's own "in X s", Ray's start excluded), its peak of chunks in flight, and the images a kill
would lose at each moment (worked on by the stage, in no committed chunk; sampled every 0.2 s while the stage
works): mean and max, less subject to when the one kill lands. ``--full-only`` runs only that (no kill).

    .venv/bin/python benchmarks/kill_cost.py --no-gate --ray-limits '{"object_store_chunks": 6}' --full
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
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


def trace(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"held": 0, "peak": 0}


def case(shard_dir: str, work: str, n: int, chunk: int, seconds: float, total: int, readers: int, kill_at: int,
         extra: list[str], env: dict, full: bool, kill: bool = True) -> dict:
    out, logs = os.path.join(work, f"out-{chunk}-{n}"), os.path.join(work, f"logs-{chunk}-{n}")
    os.makedirs(logs)
    stage = {"name": "model", "class": "tests.doubles:HoldGpu", "gpus": 1, "batch_size": 4,
             "params": {"seconds_per_image": seconds, "work_log": logs}}
    args = [sys.executable, os.path.join(ROOT, "benchmarks", "kill_cost_job.py"), "--input", shard_dir, "--output", out,
            "--set", f"stages={json.dumps([stage])}", "--set", f"input.chunk_images={chunk}",
            "--set", f"input.readers={readers}", "--set", "input.batch_images=4", "--set", "ray.num_cpus=4",
            "--set", "ray.num_gpus=1", *extra]
    result = {"chunk": chunk}
    if full:  # uninterrupted: run time, peak, and what a kill would lose at every moment; then cleared
        env["KILL_COST_TRACE"] = os.path.join(work, f"trace-full-{chunk}.json")
        driver = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        at_risk = []  # images worked on and in no committed chunk, sampled while the stage works
        while driver.poll() is None:
            at = len(worked(logs))
            if 0 < at < total:
                at_risk.append(at - sum(m["images"] for m in OutputStore(out).markers()))
            time.sleep(0.2)
        stdout, stderr = driver.communicate()
        took = re.search(r"this run: .* in ([0-9.]+) s", stdout)
        result.update(full_seconds=float(took.group(1)) if took and driver.returncode == 0 else None,
                      full_peak=trace(env["KILL_COST_TRACE"])["peak"], exposed_max=max(at_risk, default=0),
                      exposed_mean=sum(at_risk) / max(len(at_risk), 1))
        if driver.returncode:
            print(stdout[-2000:], stderr[-4000:], file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(logs)
        os.makedirs(logs)
    if not kill:
        return {**result, "worked": 0, "committed": 0, "chunks": 0, "lost": 0, "kill_peak": "", "exact": True}
    env["KILL_COST_TRACE"] = os.path.join(work, f"trace-kill-{chunk}.json")
    driver = subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env)
    while len(worked(logs)) < kill_at and driver.poll() is None:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done = worked(logs)
    peak = trace(env["KILL_COST_TRACE"])["peak"]
    markers = OutputStore(out).markers()
    committed = sum(m["images"] for m in markers)
    lost = len(done) - committed
    env["KILL_COST_TRACE"] = os.path.join(work, f"trace-resume-{chunk}.json")
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    rows = pads.dataset(out, format="parquet").to_table(columns=["shard", "index"]).to_pylist()
    exact = len(rows) == total and len({(r["shard"], r["index"]) for r in rows}) == total
    return {**result, "worked": len(done), "committed": committed, "chunks": len(markers), "lost": lost,
            "kill_peak": peak, "exact": exact and resumed.returncode == 0}


def exposed(r: dict) -> str:
    return f"{r['exposed_mean']:.0f} / {r['exposed_max']}" if "exposed_max" in r else ""


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
    parser.add_argument("--no-gate", action="store_true", help="readers never wait at the chunk gate (it still counts)")
    parser.add_argument("--ray-limits", default="", help="JSON: Ray Data limits (benchmarks/kill_cost_job.py)")
    parser.add_argument("--full", action="store_true", help="first an uninterrupted run: run time and peak")
    parser.add_argument("--full-only", action="store_true", help="only the uninterrupted run (no kill, no resume)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="sculpt-kill-")
    try:
        shard_dir = os.path.join(work, "in")
        samples.make_sample_shards(shard_dir, shards=args.shards, images_per_shard=args.images, scale=0.25,
                                   compressed=args.gzip)
        total = args.shards * args.images
        kill_at = int(args.kill_at * total)
        image_bytes = sum(os.path.getsize(p) for p in glob.glob(os.path.join(shard_dir, "*"))) / total
        limits = json.loads(args.ray_limits or "{}")
        print(f"{args.shards} {'compressed ' if args.gzip else ''}shards x {args.images} images "
              f"(~{image_bytes / 1024:.1f} KB each in the tars), {args.seconds} s per image, "
              f"{args.readers} readers, blocks of {args.block_bytes or 'default'} bytes, "
              f"gate: {'passed through' if args.no_gate else 'sculpt'}, Ray Data limits: {limits or 'defaults'}, "
              f"killed once {kill_at} images are worked on")
        print("| chunk images | worked on at the kill | in committed chunks | chunks committed | model work lost (images) "
              "| lost / chunk | chunks in flight, peak before the kill | full run s | full run peak "
              "| exposed images, mean / max over the full run | resume exact |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        extra = ["--set", f"ray.block_bytes={args.block_bytes}"] if args.block_bytes else []
        for n, chunk in enumerate(int(c) for c in args.chunks.split(",")):
            these = dict(limits)
            if "object_store_chunks" in these:
                these["object_store_memory"] = int(these.pop("object_store_chunks") * chunk * image_bytes)
            env = {**os.environ, "KILL_COST_GATE": "pass" if args.no_gate else "sculpt",
                   "KILL_COST_RAY": json.dumps(these)}
            r = case(shard_dir, work, n, chunk, args.seconds, total, args.readers, kill_at, extra, env,
                     args.full or args.full_only, kill=not args.full_only)
            print(f"| {chunk} | {r['worked']} | {r['committed']} | {r['chunks']} | {r['lost']} | "
                  f"{r['lost'] / chunk:.2f} | {r['kill_peak']} | {r.get('full_seconds', '')} "
                  f"| {r.get('full_peak', '')} | {exposed(r)} | {'yes' if r['exact'] else 'NO'} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
