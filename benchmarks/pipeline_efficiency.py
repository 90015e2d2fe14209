"""Pipeline efficiency and memory of the real workflow code with stand-in GPU stages.

Stages are tests.doubles.HoldGpu: each actor holds its (logical) GPU share for a fixed service time per image,
like a model would. The slowest-stage bound is min over stages of actors / seconds_per_image; the achieved rate
is measured over the middle of the run — the images committed in the middle 60 % of the time between the first
and the last commit — so actor start-up (slow on 2 cores) and the drain at the end are excluded; both are reported too.
Peak memory at 1x and 10x input, sampled every 0.3 s, object store capped at 2 GiB: the driver's PSS and USS and
the summed PSS of all Ray processes. PSS, not RSS: every process maps Ray's shared-memory object store, and RSS
counts each shared page touched in every process that touched it, so it grows with the bytes streamed through
even when no process holds more (measured: driver RSS 335 -> 388 MB from 10 to 100 shards, USS 244 -> 238 MB).

    .venv/bin/python benchmarks/pipeline_efficiency.py [--quick] [--only cluster --slowdown 2]
        [--only driver --set KEY=VALUE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH")] if p)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import psutil  # noqa: E402
import ray  # noqa: E402

from sculpt import config  # noqa: E402
from sculpt.engine.job import annotate as run_job
from sculpt.testing import samples
from sculpt.outputs.store import OutputStore  # noqa: E402


def chain(scale: int, seconds: float) -> list[dict]:
    """A caption-like stage that is the bottleneck, then three lighter ones; `scale` multiplies the actors.

    GPUs used per scale: caption 2x1, ground 1x0.5, mask 1x0.5, verify 1x1 = 4 GPUs.
    """
    def stage(name, actors, gpus, per_image):
        return {"name": name, "class": "tests.doubles:HoldGpu", "actors": actors * scale, "gpus": gpus, "cpus": 0.25,
                "batch_size": 4, "params": {"seconds_per_image": per_image}}

    return [stage("caption", 2, 1, seconds), stage("ground", 1, 0.5, seconds / 3), stage("mask", 1, 0.5, seconds / 4),
            stage("verify", 1, 1, seconds / 2)]


def bound(stages: list[dict]) -> float:
    return min(s["actors"] / s["params"]["seconds_per_image"] for s in stages)


class MemorySampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.driver_peak = self.driver_uss_peak = self.ray_peak = 0
        self.host_busy: list[tuple[float, float]] = []  # (time, % of all CPUs busy since the sample before)
        self.stop = threading.Event()

    def run(self):
        me = psutil.Process()
        while not self.stop.is_set():
            mine = me.memory_full_info()
            self.driver_peak = max(self.driver_peak, mine.pss)
            self.driver_uss_peak = max(self.driver_uss_peak, mine.uss)
            total = 0
            for proc in psutil.process_iter(["name", "cmdline"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                    if proc.pid != me.pid and ("ray::" in cmd or "/ray/" in cmd or proc.info["name"] in ("raylet", "gcs_server")):
                        total += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.ray_peak = max(self.ray_peak, total)
            self.host_busy.append((time.time(), psutil.cpu_percent(None)))
            time.sleep(0.3)


# the driver case: many small chunks, so that the driver's work per chunk dominates
DRIVER_CHUNKS = ["input.chunk_images=2", "input.chunks_in_flight=64"]


def job_config(shard_dir: str, out: str, stages: list[dict], extra=()):
    return config.load(None, [f"input.shards=[{shard_dir}]", f"output.path={out}", f"stages={json.dumps(stages)}",
                              "input.readers=2", "input.batch_images=8", "progress_seconds=1000", *extra])


def run_case(shard_dir: str, gpus: int, stages: list[dict], work: str, nodes: int = 1, extra: list[str] = ()) -> dict:
    from actors.vlm import vlm_engines
    from tests.doubles import TimedEngine

    out = os.path.join(work, f"out-{gpus}-{time.time_ns()}")
    cfg = job_config(shard_dir, out, stages, extra)
    runtime_env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    cluster = None
    if nodes == 1:
        ray.init(num_cpus=32, num_gpus=gpus, include_dashboard=False, logging_level="ERROR",
                 object_store_memory=2 << 30, runtime_env=runtime_env)
    else:  # simulated nodes: one raylet and object store each, GPUs split evenly
        from ray.cluster_utils import Cluster

        node = {"num_cpus": 64 // nodes, "num_gpus": gpus // nodes, "object_store_memory": (2 << 30) // nodes}
        cluster = Cluster(initialize_head=True, head_node_args=node)
        for _ in range(nodes - 1):
            cluster.add_node(**node)
        ray.init(address=cluster.address, logging_level="ERROR", runtime_env=runtime_env)
    sampler = MemorySampler()
    sampler.start()
    try:
        built = [config.build_stage(s) for s in cfg.stages]
        with contextlib.redirect_stdout(sys.stderr), vlm_engines(cfg, built, engine_class=TimedEngine):
            summary = run_job(cfg, built)  # stdout carries the JSON result
        markers = sorted(OutputStore(out).markers(), key=lambda m: m["committed"])
    finally:
        sampler.stop.set()
        sampler.join()
        ray.shutdown()
        if cluster:
            cluster.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    # the middle 60 % of the time between the first and the last commit: a window in time, not in commits,
    # so that units committed in a burst at one edge cannot stretch or shrink it
    start, end = markers[0]["committed"], markers[-1]["committed"]
    opens, closes = start + 0.2 * (end - start), start + 0.8 * (end - start)
    steady = sum(m["images"] for m in markers if opens < m["committed"] <= closes) / (closes - opens)
    busy = [pct for t, pct in sampler.host_busy if opens < t <= closes]
    return {**summary, "steady_images_per_s": steady, "host_busy_pct": sum(busy) / max(len(busy), 1),
            "driver_peak_mb": sampler.driver_peak / 2**20,
            "driver_cpu_s": sum(psutil.Process().cpu_times()[:2]),
            "driver_uss_peak_mb": sampler.driver_uss_peak / 2**20,
            "ray_peak_mb": sampler.ray_peak / 2**20}


def run_isolated(shard_dir: str, gpus: int, stages: list[dict], work: str, nodes: int = 1, extra: list[str] = ()) -> dict:
    """run_case in a fresh interpreter, so that one case's leftovers never count in the next one's peak."""
    case = json.dumps({"shard_dir": shard_dir, "gpus": gpus, "stages": stages, "work": work, "nodes": nodes,
                       "extra": list(extra)})
    done = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"benchmark case failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run, not for the record)")
    parser.add_argument("--only", choices=["throughput", "memory", "cluster", "driver"], help="run one part")
    parser.add_argument("--nodes", type=int, default=1, help="simulated nodes (ray.cluster_utils.Cluster) for throughput")
    parser.add_argument("--slowdown", type=float, default=1.0, help="service times x this in the cluster case")
    parser.add_argument("--set", action="append", default=[], help="a config override for the cluster and driver cases")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(**json.loads(args.case))))
        return
    work = tempfile.mkdtemp(prefix="sculpt-bench-")
    per_shard = 20
    seconds = 0.4

    if args.only in (None, "throughput"):
        throughput(work, per_shard, seconds, args.quick, args.nodes)
    if args.only in (None, "memory"):
        memory(work, per_shard, args.quick)
    if args.only in (None, "cluster"):
        cluster(work, args.quick, slowdown=args.slowdown, overrides=args.set)
    if args.only in (None, "driver"):
        driver(work, args.quick, overrides=args.set)
    shutil.rmtree(work, ignore_errors=True)


def throughput(work, per_shard, seconds, quick, nodes):
    print(f"## Throughput against the slowest-stage bound ({nodes} node{'s' if nodes > 1 else ''})")
    print("| logical GPUs | images | bound img/s | achieved img/s (steady) | efficiency | end-to-end s | first output s |")
    print("|---|---|---|---|---|---|---|")
    for scale in (2, 4):
        stages = chain(scale, seconds)
        gpus = 4 * scale
        images = int(bound(stages) * (10 if quick else 40))
        shard_dir = os.path.join(work, f"in-{gpus}")
        samples.make_sample_shards(shard_dir, shards=images // per_shard, images_per_shard=per_shard)
        r = run_isolated(shard_dir, gpus, stages, work, nodes)
        print(f"| {gpus} | {r['images']} | {bound(stages):.1f} | {r['steady_images_per_s']:.2f} | "
              f"{r['steady_images_per_s'] / bound(stages):.3f} | {r['seconds']:.1f} | {r['first_output_seconds']:.1f} |", flush=True)


def memory(work, per_shard, quick):
    print("\n## Peak memory at 1x and 10x input (8 logical GPUs, 20 images per shard)")
    print("| input | shards | images | driver peak PSS MB | driver peak USS MB | Ray processes peak PSS MB | img/s (steady) |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for factor in (1, 10):
        shards = (5 if quick else 10) * factor
        shard_dir = os.path.join(work, f"mem-{factor}")
        samples.make_sample_shards(shard_dir, shards=shards, images_per_shard=per_shard)
        r = results[factor] = run_isolated(shard_dir, 8, chain(2, 0.05), work)
        print(f"| {factor}x | {shards} | {r['images']} | {r['driver_peak_mb']:.0f} | {r['driver_uss_peak_mb']:.0f} | {r['ray_peak_mb']:.0f} | "
              f"{r['steady_images_per_s']:.1f} |", flush=True)
    for key in ("driver_peak_mb", "driver_uss_peak_mb", "ray_peak_mb"):
        print(f"{key}: 10x / 1x = {results[10][key] / results[1][key]:.3f}")


def cluster(work, quick, chunks_in_flight=64, slowdown=1.0, overrides=()):
    """4 simulated nodes, 32 logical GPUs, the VLM engine pool in the loop (stand-in engines), chunked units.

    ``slowdown`` multiplies every service time: the same chain at a lower rate asks less of this machine's CPUs
    per second, which separates what the pipeline loses from what the host's 2 cores cannot keep up with."""
    engines = {"replicas": 12, "slots": 4, "seconds": 2.4 * slowdown}  # 12 engines x 4 slots / 2.4 s = 20 captions/s
    stages = [
        {"name": "caption", "actors": 4, "cpus": 0.25, "batch_size": 8},  # the real Captioner, asking the pool
        {"name": "ground", "class": "tests.doubles:HoldGpu", "actors": 8, "gpus": 1, "cpus": 0.25, "batch_size": 4,
         "params": {"seconds_per_image": 0.32 * slowdown}},
        {"name": "mask", "class": "tests.doubles:HoldGpu", "actors": 4, "gpus": 1, "cpus": 0.25, "batch_size": 4,
         "params": {"seconds_per_image": 0.12 * slowdown}},
        {"name": "verify", "class": "tests.doubles:HoldGpu", "actors": 8, "gpus": 1, "cpus": 0.25, "batch_size": 4,
         "params": {"seconds_per_image": 0.32 * slowdown}}]
    limit = min(engines["replicas"] * engines["slots"] / engines["seconds"], bound(stages[1:]))
    extra = [f"vlm.replicas={engines['replicas']}", "vlm.cpus=0.25", "models.vlm=stand-in",
             f"vlm.engine_kwargs={json.dumps({'seconds': engines['seconds'], 'slots': engines['slots']})}",
             "input.chunk_images=10", f"input.chunks_in_flight={chunks_in_flight}", "input.readers=4", *overrides]
    images = int(limit * slowdown * (20 if quick else 60))  # as many images at any slowdown
    shard_dir = os.path.join(work, "in-cluster")
    samples.make_sample_shards(shard_dir, shards=images // 40, images_per_shard=40)
    r = run_isolated(shard_dir, 32, stages, work, nodes=4, extra=extra)
    print(f"\n## 4 simulated nodes, 32 logical GPUs, VLM engine pool in the loop, chunks of 10 images, "
          f"service times x{slowdown:g}")
    print("| logical GPUs | images | chunks | chunks in flight (bound, peak) | bound img/s | achieved img/s (steady) "
          "| efficiency | host CPU busy (steady) | driver bytes/image | end-to-end s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| 32 (4 × 8) | {r['images']} | {r['committed_now']} | {chunks_in_flight}, {r['chunks_in_flight_peak']} | {limit:.1f} | "
          f"{r['steady_images_per_s']:.2f} | {r['steady_images_per_s'] / limit:.3f} | {r['host_busy_pct']:.0f} % | "
          f"{r['driver_bytes_per_image']} | {r['seconds']:.1f} |", flush=True)


def driver(work, quick, overrides=()):
    """The driver's CPU time and memory from 100 to 1,000 shards (short service times: the driver's own work)."""
    print("\n## Driver CPU and memory, 100 vs 1,000 shards (4 images each, chunks of 2)")
    print("| shards | chunks | end-to-end s | driver CPU s | driver CPU ms per chunk | driver peak PSS MB | driver peak USS MB |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for shards in (100, 1000) if not quick else (20, 200):
        shard_dir = os.path.join(work, f"driver-{shards}")
        samples.make_sample_shards(shard_dir, shards=shards, images_per_shard=4, scale=0.25)
        r = results[shards] = run_isolated(shard_dir, 4, chain(1, 0.001), work,
                                            extra=[*DRIVER_CHUNKS, *overrides])
        print(f"| {shards} | {r['committed_now']} | {r['seconds']:.1f} | {r['driver_cpu_s']:.1f} | {1000 * r['driver_cpu_s'] / r['committed_now']:.2f} | "
              f"{r['driver_peak_mb']:.0f} | {r['driver_uss_peak_mb']:.0f} |", flush=True)
    small, large = sorted(results)
    for key in ("driver_peak_mb", "driver_uss_peak_mb"):
        print(f"{key}: {large} / {small} shards = {results[large][key] / results[small][key]:.3f}")
    per_chunk = [results[n]["driver_cpu_s"] / results[n]["committed_now"] for n in (small, large)]
    print(f"driver CPU per chunk: {large} / {small} shards = {per_chunk[1] / per_chunk[0]:.3f}")


if __name__ == "__main__":
    main()
