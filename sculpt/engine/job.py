"""One annotation job, top-down: ``sculpt run`` (and ``workflows/annotate.py``) is ``main`` below.

    load the config -> plan (reads, never writes) -> join or start Ray -> take the output (its lease, its clean
    slate and its job file, given back once) -> start the VLM engines -> run -> print the summary
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys

from sculpt import config as job_config
from sculpt import errors
from sculpt.config import JobConfig
from sculpt.engine import cluster, pipeline, planning, progress
from sculpt.engine.planning import Plan
from sculpt.io import inputs
from sculpt.io.lease import Lease
from sculpt.outputs.store import OutputStore
from sculpt.stage import Stage

VLM_POOL = "actors.vlm:vlm_engines"  # found by name, as the built-in stages are (sculpt.stage.BUILTIN_STAGES)


def main(args) -> int:
    """The job of ``sculpt run``'s arguments; returns the exit code (2: a job-level error, 1: units left pending)."""
    try:
        config = job_config.load(*config_of(args))
        stages = job_config.build_stages(config)
        with errors.at_job_level(config.output.path):  # the output unreadable (S3 unreachable...): one line
            todo = planning.plan(config, stages)
        if todo.segments:
            cluster.start(config, stages)
        with take_output(config, stages, todo) as (todo, lease), vlm_pool(config, stages if todo.segments else []):
            summary = pipeline.run(config, stages, todo, lease)
    except Exception as exc:
        message = errors.job_error(exc)  # sculpt's own job-level errors; anything else keeps its traceback
        if message is None:
            raise
        print(f"sculpt: error: {message}", file=sys.stderr)
        return 2
    return tell(summary, demo=is_demo(args))


def annotate(config: JobConfig, stages: list[Stage], todo: Plan | None = None) -> dict:
    """The job as a library call (on the Ray already started, or a new local one): plan, take the output, run."""
    todo = todo or planning.plan(config, stages)
    with take_output(config, stages, todo) as (todo, lease):
        return pipeline.run(config, stages, todo, lease)


@contextlib.contextmanager
def take_output(config: JobConfig, stages: list[Stage], todo: Plan):
    """Hold the output for the job: its lease (one job per output), then a clean slate (another config's output
    deleted with ``output.overwrite``, a killed run's temporary files and uploads gone) and the job file. Yields the
    plan (made again if another job committed units since it was made) and the lease; gives the lease back once,
    leaving only the output's own files. A store's fault in any of these ends the job with one line (a full disk,
    S3 unreachable or refusing) that says what the job was doing."""
    with errors.at_job_level(todo.store.uri, doing="taking the output's lease"):
        lease = Lease(todo.store.uri, config.s3).acquire()
    try:
        with errors.at_job_level(todo.store.uri, doing="clearing the output and writing the job file"):
            if todo.store.prepare(todo.job, overwrite=config.output.overwrite) != todo.committed:
                todo = planning.plan(config, stages)
            for shard, files in todo.listings.items():  # a folder's listing, recorded before any of it is read
                inputs.write_listing(todo.store.uri, shard, files, config.s3)
        yield todo, lease
    except BaseException:
        give_back(todo.store, lease, failing=True)
        raise
    give_back(todo.store, lease)


def give_back(store: OutputStore, lease: Lease, failing: bool = False) -> None:
    """Tidy the output, then give its lease back, even when tidying failed. A store's fault tidying ends a job that
    went well with its one line; one that is ``failing`` already ends with its own error, which this must not hide:
    a warning then."""
    try:
        try:
            with errors.at_job_level(store.uri, doing="tidying the output"):
                store.tidy()
        finally:
            lease.release()  # a store's fault giving it back is its own warning: the lease is free after its ttl
    except Exception as exc:
        if not failing:
            raise
        print(f"sculpt: warning: {errors.job_error(exc) or errors.describe(exc)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def vlm_pool(config: JobConfig, stages: list[Stage]):
    module, _, name = VLM_POOL.partition(":")
    with getattr(importlib.import_module(module), name)(config, stages) as engines:
        yield engines


def config_of(args) -> tuple[str | None, list[str]]:
    """The config file and ``--set`` items of ``sculpt run``'s arguments (the demo's when no input is given, or
    with ``--demo``), the flags turned into overrides after them."""
    path, items = args.config, list(args.set)
    if is_demo(args):
        from sculpt.testing import demo

        path, first = demo.prepare(args.input)
        items = first + items
    for flag, key in (("input", "input.shards"), ("output", "output.path"), ("s3_endpoint", "s3.endpoint")):
        if getattr(args, flag):
            items.append(f"{key}={json.dumps(getattr(args, flag))}")
    for flag, key in (("overwrite", "output.overwrite"), ("redo_errors", "output.redo_errors")):
        if getattr(args, flag):
            items.append(f"{key}=true")
    return path, items


def is_demo(args) -> bool:
    """No config and no input, or ``--demo`` (the demo's tiny models, on ``--input`` when given)."""
    return getattr(args, "demo", False) or not args.config and not args.input


def tell(summary: dict, demo: bool = False) -> int:
    """Print the run's summary and where its rows are; 1 when units were left pending."""
    print("\n".join(progress.describe(summary)))
    out = summary["output"]
    print(f"Rows: {out}/*.parquet (pyarrow.dataset or pandas; sculpt.schema.decode_masks for masks). "
          f"Totals: `sculpt status {out}`; statistics and plots: `sculpt report {out}`.")
    if demo:  # the demo ends with a look at what it made
        from sculpt.outputs import preview

        written = preview.write_preview(out, os.path.join(out, "_preview"))
        print(f"Preview: open {os.path.abspath(written['index'])} in a browser ({written['cards']} images).")
        print(f"Training data: `sculpt export {out} gcg.json --format gcg` (GLaMM), `--format refcoco` (refer API), "
              "`--format llava` (LISA-style conversations); README: Export.")
    if summary["pending"]:
        first, why = next(iter(summary["pending"].items()))
        print(f"sculpt: {len(summary['pending'])} unit(s) left pending after transient faults (first: {first}: {why}); "
              "rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0
