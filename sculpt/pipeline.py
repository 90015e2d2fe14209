"""The streaming engine: shards -> reader tasks -> one fixed actor pool per stage -> per-shard commits.

What to do (shards, committed units, the output's lease) is decided by ``sculpt.planning``, without Ray; this
module runs it.

Ray Data streams blocks of rows through every stage at once, with backpressure, so memory is bounded by the
blocks in flight, not by the number of shards. The driver consumes the last stage's output and hands each row
to the UnitWriter of its shard; when a shard's rows are all in, the unit is committed (Parquet, then marker).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import time
import warnings

import pyarrow as pa
import pyarrow.compute as pc

from sculpt import errors, report, schema, shards, stats, storage
from sculpt.config import JobConfig
from sculpt.output import UnitWriter
from sculpt.planning import Plan, plan
from sculpt.stage import Stage, actor_class, ray_options

STATS_FILE = "_stats.json"  # the whole job's statistics, rewritten at the end of every run


def _read(batch: pa.Table, options: shards.ReadOptions, only: dict[str, list[int]]):
    for uri in batch["uri"].to_pylist():
        for rows in shards.read_shard(uri, options, set(only[uri]) if uri in only else None):
            if rows:
                yield schema.to_table(rows)


def build_dataset(shard_uris: list[str], stages: list[Stage], config: JobConfig, only: dict[str, list[int]] | None = None):
    """The streaming dataset of the shards' rows through every stage; ``only``: shard -> the indices to read."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints its own shard-level progress
    # sculpt's own lines tell the story; Ray Data's notes on its plan stay in Ray's log files
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"ray\.data\..*")
    options = shards.ReadOptions(
        batch_images=config.input.batch_images,
        max_image_pixels=config.input.max_image_pixels,
        keep_source_annotations=config.input.keep_source_annotations,
        s3=config.s3,
        read_attempts=config.faults.read_attempts,
        retry_backoff=config.faults.backoff_seconds,
    )
    ds = ray.data.from_items([{"uri": uri} for uri in shard_uris], override_num_blocks=len(shard_uris))
    ds = ds.map_batches(
        _read,
        fn_kwargs={"options": options, "only": only or {}},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=config.input.readers),
        num_cpus=1,
    )
    for stage in stages:
        ds = ds.map_batches(
            actor_class(stage),
            fn_constructor_args=(stage, config.faults.attempts, config.faults.backoff_seconds, stage is stages[-1]),
            batch_size=stage.batch_size,
            batch_format="pyarrow",
            **ray_options(stage.resources),
        )
    return ds


class Progress:
    def __init__(self, total: int, done: int, every: float, out=sys.stdout):
        self.total, self.done, self.every, self.out = total, done, every, out
        self.todo = total - done
        self.images = 0
        self.images_per_shard: list[int] = []
        self.first_output: float | None = None  # seconds until the first row came out of the last stage
        self.start = self.last = time.monotonic()

    def rows(self, n: int) -> None:
        if self.first_output is None:
            self.first_output = time.monotonic() - self.start
        self.images += n
        if time.monotonic() - self.last >= self.every:
            self.print()

    def unit(self, marker: dict) -> None:
        self.done += 1
        self.images_per_shard.append(marker["rows"])
        self.print(f"committed {marker['unit']} ({marker['images']} images, {marker['errors']} errors)")

    def print(self, event: str = "") -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.start
        rate = self.images / elapsed if elapsed > 0 else 0.0
        eta = "?"
        if self.images_per_shard and rate > 0:
            mean = sum(self.images_per_shard) / len(self.images_per_shard)
            left = max(0.0, (self.total - self.done) * mean - (self.images - sum(self.images_per_shard)))
            eta = time.strftime("%H:%M:%S", time.gmtime(left / rate))
        line = f"[sculpt] shards {self.done}/{self.total} | images {self.images} | {rate:.2f} img/s | ETA {eta}"
        print(f"{line} | {event}" if event else line, file=self.out, flush=True)


class ErrorBudgetExceeded(RuntimeError):
    """A model stage failed too many images of a unit: the job stops before writing a dataset of errors."""


def _transient_failure(table: pa.Table) -> str | None:
    reasons = pc.drop_null(table["transient_error"])
    return reasons[0].as_py() if len(reasons) else None


def run(config: JobConfig, stages: list[Stage], todo: Plan | None = None) -> dict:
    """Annotate every shard not yet committed under the output path; returns a summary of this run.

    A unit with an image whose transient fault outlasted its retries, or whose commit failed, is left pending
    (``summary["pending"]``, unit -> why) and the others go on; a rerun does the pending ones. The output's lease
    (taken by ``plan``) is given back at the end, whatever happens."""
    todo = todo or plan(config, stages)
    try:
        return _annotate(config, stages, todo)
    finally:
        if todo.lease is not None:
            todo.lease.release()


def _annotate(config: JobConfig, stages: list[Stage], todo: Plan) -> dict:
    store, job, all_shards = todo.store, todo.job, todo.all_shards
    progress = Progress(len(all_shards), len(all_shards) - len(todo.pending), config.progress_seconds)
    markers: list[dict] = []
    pending: dict[str, str] = {}
    writers: dict[str, UnitWriter] = {}
    driver_bytes = 0  # what the rows cost the driver to receive
    dataset = build_dataset(todo.pending, stages, config, todo.redo) if todo.pending else None
    try:
        for uri in todo.redo:  # a redone unit starts from its committed good rows
            writer = writers[shards.shard_name(uri)] = UnitWriter(store, shards.shard_name(uri), job)
            writer.resume_from(store.read_unit(writer.unit))
        for table in dataset.iter_batches(batch_size=None, batch_format="pyarrow") if dataset else []:
            progress.rows(table.num_rows)
            driver_bytes += table.nbytes
            for unit in pc.unique(table["shard"]).to_pylist():
                if unit in pending:
                    continue  # rows still arriving for a unit already given up on
                part = table.filter(pc.equal(table["shard"], unit))
                why = _transient_failure(part)
                if why is None:
                    writer = writers.setdefault(unit, UnitWriter(store, unit, job))
                    try:
                        writer.add(part)
                        if not writer.complete:
                            continue
                        over = writer.over_error_budget(config.faults.max_error_share, config.faults.min_errors)
                        if over:
                            raise ErrorBudgetExceeded(over)
                        markers.append(writer.commit())
                        del writers[unit]
                        progress.unit(markers[-1])
                        continue
                    except OSError as exc:  # the output store, past its own retries
                        if exc.errno == errno.ENOSPC:
                            raise  # no unit can be written: the job stops with one line (sculpt.errors.job_error)
                        why = f"write: {errors.describe(exc)}"
                if unit in writers:
                    writers.pop(unit).abort()
                pending[unit] = why
                progress.print(f"left {unit} pending: {why}")
        if writers:
            missing = {unit: f"{len(w.seen)}/{w.expected}" for unit, w in writers.items()}
            raise RuntimeError(f"the pipeline ended with incomplete shards (rows seen/expected): {missing}")
    finally:
        for writer in writers.values():
            writer.abort()
    summary = {
        "shards": len(all_shards),
        "committed_now": len(markers),
        "pending": pending,
        "images": sum(m["images"] for m in markers),
        "rows": sum(m["rows"] for m in markers),
        "errors": sum(m["errors"] for m in markers),
        "input_bytes_read": sum(m["input_bytes_read"] for m in markers),
        "seconds": round(time.monotonic() - progress.start, 2),
        "first_output_seconds": round(progress.first_output or 0.0, 2),
        "driver_bytes_per_image": round(driver_bytes / max(progress.images, 1)),
        "output": store.uri,
    }
    job_total, _ = report.job_stats(store)  # every committed unit, this run's and earlier ones
    storage.write_atomic(storage.join(store.uri, STATS_FILE),
                         json.dumps({**job_total, "derived": stats.derived(job_total)}, indent=1).encode(), config.s3)
    summary["job"] = _rounded({key: value for key, value in stats.derived(job_total).items() if value is not None})
    progress.print("done" if not pending else f"done; {len(pending)} unit(s) left pending, rerun to retry them")
    return summary


def resource_demand(config: JobConfig, stages: list[Stage]) -> dict[str, float]:
    """CPUs and GPUs the job holds at once: every stage's fixed pool, the VLM engines, the shard readers."""
    demand = {"CPU": float(config.input.readers), "GPU": 0.0}
    for stage in stages:
        demand["CPU"] += stage.resources.cpus * stage.resources.actors
        demand["GPU"] += stage.resources.gpus * stage.resources.actors
    if any(stage.model_key == "vlm" for stage in stages):
        demand["CPU"] += config.vlm.cpus * config.vlm.replicas
        demand["GPU"] += (config.vlm.tensor_parallel if config.vlm.tensor_parallel > 1 else config.vlm.gpus) * config.vlm.replicas
    return demand


def _rounded(value):
    if isinstance(value, dict):
        return {key: _rounded(v) for key, v in value.items()}
    return round(value, 3) if isinstance(value, float) else value


def check_resources(config: JobConfig, stages: list[Stage], fixed_cluster: bool) -> None:
    """Refuse a job that cannot all be placed on a fixed cluster (Ray would wait for it forever); on a cluster
    that may scale up, only say so."""
    import ray

    have = ray.cluster_resources()
    short = {k: (need, have.get(k, 0.0)) for k, need in resource_demand(config, stages).items() if need > have.get(k, 0.0)}
    if not short:
        return
    message = "; ".join(f"the job holds {need:g} {k} at once, the cluster has {got:g}" for k, (need, got) in short.items())
    if not fixed_cluster:
        print(f"[sculpt] waiting for the cluster to grow: {message}", flush=True)
        return
    raise ValueError(
        f"{message}. Lower stage actors/cpus/gpus or input.readers, or give a new local Ray more logical "
        "resources (--set ray.num_cpus=N ray.num_gpus=N; logical GPUs run only tiny models on the CPU)."
    )


def connect_ray(config: JobConfig) -> bool:
    """Join the job's cluster (``ray job submit`` / RAY_ADDRESS / ray.address) or start a local Ray.

    Returns True when this call started a local Ray, whose resources are then fixed."""
    import ray

    if ray.is_initialized():
        return False
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    # Workers of a local Ray import stage classes by module path: give them the driver's import path.
    path = os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)
    ray.init(
        address="local",  # a new instance even when a `ray start` cluster runs on this machine
        num_cpus=config.ray.num_cpus,
        num_gpus=config.ray.num_gpus,
        runtime_env={"env_vars": {"PYTHONPATH": path, **QUIET_LIBRARIES}},
        include_dashboard=False,
        logging_level="WARNING",
    )
    return True


# Worker environment of a local run: the libraries' INFO chatter (every vLLM engine step, transformers' notes)
# off the terminal; warnings and errors still show, and everything stays in Ray's session logs.
QUIET_LIBRARIES = {"VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


def describe(summary: dict) -> list[str]:
    """The run summary as a person reads it (the numbers are also in OUT/_stats.json and the markers)."""
    job = summary.get("job", {})
    whole = f"[sculpt] whole output ({summary['shards']} shards): {job.get('objects_per_image', 0):.1f} objects per image"
    if job.get("keep_rate") is not None:
        whole += f", {job['keep_rate']:.0%} of verified pairs kept"
    kinds = job.get("keep_rate_by_category", {})
    if kinds:
        whole += "; kept by kind: " + ", ".join(f"{kind} {rate:.0%}" for kind, rate in sorted(kinds.items()))
    lines = [f"[sculpt] this run: {summary['committed_now']} unit(s) committed, {summary['images']} images "
             f"({summary['errors']} errors) in {summary['seconds']:.1f} s; {len(summary['pending'])} left pending", whole]
    rates = job.get("stage_images_per_second", {})
    if rates:
        lines.append("[sculpt] images/s per actor: " + ", ".join(f"{stage} {rate:.1f}" for stage, rate in rates.items()))
    return lines
