"""The five-stage chain on tiny models: sculpt's Ray pipeline versus a plain sequential loop in one process.

Both run the same Stage objects (``sculpt.config.build_stages``: caption, ground, mask, refer, verify on the
tiny checkpoints of ``sculpt.testing.kit.write_tiny_models``, plus ``Boxes``: the tiny Florence-2 finds no boxes, so
a stand-in after it gives each image ``--objects`` boxes for mask, refer and verify to work on) over the same
sample shards with the same settings
(one actor per stage, ``input.batch_images`` and every stage's ``batch_size`` = 2, short generations), and both
write the same Parquet units through ``sculpt.outputs.store``.

- ray: a local Ray with logical GPUs, ``actors.vlm.vlm_engines`` (one vLLM engine actor) + ``sculpt.engine.pipeline.run``.
- sequential: one process (torch's default threads; and again with OMP_NUM_THREADS=1, which is what Ray gives
  every 1-CPU actor); the vLLM engine is an in-process ``actors.vlm.VLMEngine`` and the two VLM stages'
  ``ask`` goes straight to it (a local adapter in place of the Ray actor lookup); every other stage's
  ``setup()`` runs in this process. Shards are read with ``sculpt.io.shards.read_shard``; each block goes through
  the stages in order (``sculpt.stage.StageActor``, the same per-batch wrapper the Ray actors run) in chunks of
  the stage's ``batch_size``, and into a ``UnitWriter``.

A ``Gate`` stage first in the chain holds all input until every Ray stage actor has run ``setup()`` (the driver
opens it), so that no backlog builds up while actors start. Start-up (Ray, the engine, the stage actors or the
setup() calls) is reported apart; "after start-up" runs from the gate's opening (Ray) or the last setup() (sequential)
to the last output, so its images/s includes the pipeline's fill and drain (Ray Data hands the driver whole-shard
blocks, too coarse for a window in the middle). Each stage's time inside process() is logged in both modes. Each
mode runs in a fresh interpreter. On 2 CPU cores the stages of the Ray pipeline compete for the same cores, so
overlap buys little; what this measures is the overhead.

    VLLM_CPU_KVCACHE_SPACE=1 RAY_AUTH_MODE=disabled PYTHONPATH=. python benchmarks/chain_ray_vs_sequential.py \
        [--shards 6] [--images 16] [--objects 8] [--one-thread]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH")] if p)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from sculpt.stage import Resources, Stage  # noqa: E402


class Boxes(Stage):
    """Stand-in objects after ground: random-weight Florence-2 finds no boxes, so mask, refer and verify would have
    nothing to do. An image left without objects gets ``per_image`` boxes on a 4 x 4 grid, each named by a word of
    the caption (with its span, as the schema wants). Defined in the script: Ray ships it by value."""

    name = "boxes"

    def process(self, rows):
        for row in rows:
            if row["objects"]:
                continue
            w, h = row["width"], row["height"]
            words = list(re.finditer(r"\w+", row["caption"] or ""))[: self.params["per_image"]]
            row["objects"] = [{"phrase": m.group(), "phrase_start": m.start(), "phrase_end": m.end(),
                               "box": [i % 4 * w / 4, i // 4 % 4 * h / 4, (i % 4 + 1) * w / 4, (i // 4 % 4 + 1) * h / 4]}
                              for i, m in enumerate(words)]
            row["status"] = "ok" if row["objects"] else row["status"]  # ground marked it empty


class Gate(Stage):
    """First in the chain: holds every batch until the file ``go`` exists. In the Ray run the driver creates it once
    every stage actor has finished ``setup()``, so that no backlog builds up while actors start and every stage is in
    flow from then on. In the sequential run it exists from the start."""

    name = "gate"

    def process(self, rows):
        while not os.path.exists(self.params["go"]):
            time.sleep(0.05)


def instrument(stage: Stage, ready_dir: str, log_dir: str) -> None:
    """Make the stage touch ``ready_dir/<name>`` when its setup() is done and log each process() call's wall time
    to ``log_dir/<name>`` (a subclass made here, which Ray ships by value)."""
    base = type(stage)

    def setup(self):
        base.setup(self)
        open(os.path.join(ready_dir, self.name), "w").close()

    def process(self, rows):
        began = time.time()
        base.process(self, rows)
        with open(os.path.join(log_dir, self.name), "a") as f:
            f.write(f"{began} {time.time()} {len(rows)}\n")

    stage.__class__ = type(base.__name__, (base,), {"setup": setup, "process": process})


def busy_seconds(log_dir: str) -> dict[str, float]:
    """Seconds each stage spent in process(), from the logs of instrument()."""
    busy = {}
    for name in os.listdir(log_dir):
        with open(os.path.join(log_dir, name)) as f:
            busy[name] = sum(float(end) - float(began) for began, end, _ in (line.split() for line in f))
    return busy


def job_config(shard_dir: str, out: str, models: dict, objects: int, go: str):
    from sculpt import config

    overrides = [f"input.shards=[{shard_dir}]", f"output.path={out}", "input.batch_images=2", "progress_seconds=1000",
                 "vlm.max_tiles=2", "vlm.max_model_len=4096", "vlm.enforce_eager=true",
                 "stages.caption.params.max_tokens=32", "stages.ground.params.max_new_tokens=64",
                 "stages.ground.params.num_beams=1", "stages.refer.params.max_tokens=12",
                 *(f"stages.{name}.{key}={value}" for name in ("caption", "ground", "mask", "refer", "verify")
                   for key, value in (("actors", 1), ("batch_size", 2))),
                 *(f"models.{key}={path}" for key, path in models.items())]
    cfg = config.load(None, overrides)
    stages = config.build_stages(cfg)
    extra = dict(resources=Resources(cpus=0.5), batch_size=2)
    return cfg, [Gate(**extra, go=go), *stages[:2], Boxes(**extra, per_image=objects), *stages[2:]]


def run_ray(cfg, stages, go: str) -> dict:
    import threading

    import ray

    from actors.vlm import vlm_engines
    from sculpt.engine import progress
    from sculpt.engine.job import annotate as run_job

    outputs = []
    rows = progress.Progress.rows

    def record(progress, n):  # the driver's per-block hook: when each block left the last stage
        outputs.append(time.monotonic())
        rows(progress, n)

    progress.Progress.rows = record
    scratch = os.path.dirname(go)
    ready_dir, log_dir = tempfile.mkdtemp(dir=scratch), tempfile.mkdtemp(dir=scratch)
    for stage in stages:
        instrument(stage, ready_dir, log_dir)
    opened = []

    def open_gate():  # once every stage actor is set up
        while len(os.listdir(ready_dir)) < len(stages):
            time.sleep(0.05)
        opened.append(time.monotonic())
        open(go, "w").close()

    start = time.monotonic()
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    ray_up = time.monotonic()
    try:
        with vlm_engines(cfg, stages):
            engine_up = time.monotonic()
            threading.Thread(target=open_gate, daemon=True).start()
            summary = run_job(cfg, stages)
    finally:
        ray.shutdown()
    return {"images": summary["images"], "end_to_end": outputs[-1] - start, "processing": outputs[-1] - opened[0],
            "start_up": {"ray.init": ray_up - start, "VLM engine": engine_up - ray_up, "stage actors": opened[0] - engine_up},
            "first_output": outputs[0] - opened[0], "busy": busy_seconds(log_dir)}


class LocalVLM:
    """What VLMStage.setup/ask do through Ray, done with an engine in this process."""

    def __init__(self, engine):
        self.engine = engine

    def attach(self, stage) -> None:
        stage.setup = lambda: None
        stage.ask = lambda encoded, requests, max_tokens: self.engine.chat(encoded, requests, max_tokens)


def run_sequential(cfg, stages, go: str) -> dict:
    import pyarrow as pa

    from actors.vlm import VLMEngine
    from sculpt.engine import planning, vlm
    from sculpt import schema
    from sculpt.io import shards
    from sculpt.outputs.units import UnitWriter
    from sculpt.stage import StageActor

    open(go, "w").close()
    scratch = os.path.dirname(go)
    log_dir = tempfile.mkdtemp(dir=scratch)
    for stage in stages:
        instrument(stage, tempfile.mkdtemp(dir=scratch), log_dir)
    start = time.monotonic()
    settings = cfg.vlm
    engine_kwargs = {"max_model_len": settings.max_model_len, "dtype": settings.dtype, "enforce_eager": settings.enforce_eager,
                     "seed": 0, **settings.engine_kwargs}  # as actors.vlm.vlm_engines builds them
    plan = vlm.engine_plan(settings.gpus, settings.cpus, settings.tensor_parallel, engine_kwargs)
    engine = VLMEngine(cfg.models.vlm, plan["engine"], settings.max_tiles, settings.min_tiles)
    engine_up = time.monotonic()
    local = LocalVLM(engine)
    for stage in stages:
        if stage.model_key == "vlm":
            local.attach(stage)
    actors = [StageActor(stage) for stage in stages]  # runs each stage's setup()
    setup_done = time.monotonic()

    todo = planning.plan(cfg, stages)
    options = shards.ReadOptions(batch_images=cfg.input.batch_images, max_image_pixels=cfg.input.max_image_pixels)
    outputs, images = [], 0
    for uri in todo.pending:
        writer = UnitWriter(todo.store, shards.shard_name(uri), todo.job)
        for rows in shards.read_shard(uri, options):
            table = schema.to_table(rows)
            for stage, actor in zip(stages, actors):
                table = pa.concat_tables([actor(table.slice(i, stage.batch_size)) for i in range(0, table.num_rows, stage.batch_size)])
            writer.add(table)
            outputs.append(time.monotonic())
            images += table.num_rows
        writer.commit()
    todo.lease.release()
    engine.shutdown()
    return {"images": images, "end_to_end": outputs[-1] - start, "processing": outputs[-1] - setup_done,
            "start_up": {"VLM engine": engine_up - start, "stage setup()": setup_done - engine_up},
            "first_output": outputs[0] - setup_done, "busy": busy_seconds(log_dir)}


MODES = {  # mode -> extra environment of its interpreter
    "sequential": {},
    "sequential, 1 thread": {"OMP_NUM_THREADS": "1"},  # as Ray gives each 1-CPU actor (OMP_NUM_THREADS=1)
    "ray": {},
}


def run_case(mode: str, shard_dir: str, out: str, models: dict, objects: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch, contextlib.redirect_stdout(sys.stderr):  # stdout: the JSON result
        go = os.path.join(scratch, "go")
        cfg, stages = job_config(shard_dir, out, models, objects, go)
        result = run_ray(cfg, stages, go) if mode == "ray" else run_sequential(cfg, stages, go)
    return {**result, "stages": [stage.name for stage in stages]}


def isolated(mode: str, shard_dir: str, out: str, models: dict, objects: int) -> dict:
    # a private RAY_TMPDIR: never join another Ray running on this machine
    ray_tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, **MODES[mode], "RAY_TMPDIR": ray_tmp}
    case = json.dumps({"mode": mode, "shard_dir": shard_dir, "out": out, "models": models, "objects": objects})
    done = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, env=env)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if done.returncode:
        raise RuntimeError(f"{mode} case failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--images", type=int, default=16, help="images per shard")
    parser.add_argument("--objects", type=int, default=8, help="stand-in boxes per image (see Boxes)")
    parser.add_argument("--one-thread", action="store_true", help="also run the sequential loop with OMP_NUM_THREADS=1")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(**json.loads(args.case))))
        return
    import pyarrow.dataset as pads

    from sculpt.testing import samples
    from sculpt.testing.kit import write_tiny_models

    work = tempfile.mkdtemp(prefix="sculpt-chain-")
    shard_dir = os.path.join(work, "in")
    samples.make_sample_shards(shard_dir, shards=args.shards, images_per_shard=args.images)
    models = write_tiny_models(os.path.join(work, "models"))
    modes = [m for m in MODES if args.one_thread or m != "sequential, 1 thread"]
    outs = {mode: os.path.join(work, "out-" + mode.replace(",", "").replace(" ", "-")) for mode in modes}
    results = {mode: isolated(mode, shard_dir, outs[mode], models, args.objects) for mode in modes}

    print(f"{args.shards} shards x {args.images} images, {args.objects} objects each, five stages on tiny models, "
          f"{os.cpu_count()} CPU cores")
    print("| mode | images | start-up s | after start-up s | first output s | img/s after start-up | end-to-end s |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["start_up"].items())
        print(f"| {mode} | {r['images']} | {sum(r['start_up'].values()):.1f} ({parts}) | {r['processing']:.1f} | "
              f"{r['first_output']:.1f} | {r['images'] / r['processing']:.2f} | {r['end_to_end']:.1f} |")
    ray = results["ray"]
    for mode in modes[:-1]:
        seq = results[mode]
        print(f"ray / {mode}: end-to-end {ray['end_to_end'] / seq['end_to_end']:.2f}, "
              f"img/s after start-up {seq['processing'] / ray['processing']:.2f}")
    print("\n| seconds in process() | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for name in results["ray"]["stages"]:
        print(f"| {name} | " + " | ".join(f"{results[m]['busy'].get(name, 0.0):.1f}" for m in modes) + " |")
    print("| all stages | " + " | ".join(f"{sum(results[m]['busy'].values()):.1f}" for m in modes) + " |")
    for mode in results:
        rows = pads.dataset(outs[mode], format="parquet").to_table().to_pylist()
        print(f"{mode} output: {Counter(r['status'] for r in rows)}, objects {sum(len(r['objects']) for r in rows)}, "
              f"verified {sum(o['iou'] is not None for r in rows for o in r['objects'])}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
