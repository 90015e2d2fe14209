"""The job's Ray Data dataset: segments of shards -> reader tasks -> one fixed actor pool per stage -> write tasks.

Ray Data streams blocks of rows through every stage at once, with backpressure (memory stays bounded by the blocks
in flight); a job-wide ``ChunkGate`` bounds the chunks read but not yet through the chain. Rows are written to part
files where they leave the last stage (``sculpt.outputs.units.write_parts``); the dataset yields only receipts.
"""

from __future__ import annotations

import functools
import logging
import warnings

import pyarrow as pa

from sculpt.config import JobConfig
from sculpt.io import exclude, inputs, shards
from sculpt.outputs import units
from sculpt.stage import Stage, actor_class, control_actor, ray_options

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
    """The job's ``ChunkGate`` actor."""
    return control_actor(ChunkGate).remote(config.chunk_limit, config.least_chunks_in_flight)


@functools.cache  # one class per process: Ray Data's registry holds classes
def forget_old_block_stats() -> type:
    """An execution callback that keeps each operator's per-block statistics to its last ``BLOCK_STATS_KEPT``.

    Ray Data keeps, in the driver, one statistics object per block an operator hands on until the Dataset ends
    (ray-project/ray#66016, open in Ray 2.60). Measured (docs/BENCHMARKS.md, driver memory): ~4 KB per block, the
    driver's USS 1.20x over 1,000 shards against 100 untrimmed and 1.14x trimmed, 18.8 against 14.3 KB per chunk;
    at SA-1B's block sizes that is ~1.3 GB per 1,000 shards. Only Ray Data's end-of-run summary reads them (the
    dashboard's metrics are counters kept apart), which then covers each operator's last blocks.

    Private names, as Ray 2.60 has no public way to bound or drop these lists: the hook's list
    (``DataContext.custom_execution_callback_classes``) is public, but the ``ExecutionCallback`` it takes lives in
    ``ray.data._internal``, and the running operators are only reachable through the executor's ``_topology``
    (each operator's ``get_stats`` returns its own lists). tests/test_private_uses.py checks these names and
    tests/test_workflow.py the trimming on a real Dataset, so a Ray that changes them fails there; drop this once
    Ray bounds the lists. It runs in the executor's loop, the thread that adds to those lists.
    """
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class ForgetOldBlockStats(ExecutionCallback):
        def on_execution_step(self, executor) -> None:
            for op in getattr(executor, "_topology", ()):  # () where Ray renamed it: untrimmed, and the tests fail
                for kept in op.get_stats().values():
                    if isinstance(kept, list) and len(kept) > 2 * BLOCK_STATS_KEPT:
                        del kept[:-BLOCK_STATS_KEPT]

    return ForgetOldBlockStats


def _split(row: dict, options: shards.ReadOptions) -> list[dict]:
    return [{"segment": piece.to_json()} for piece in inputs.split(shards.Segment.from_json(row["segment"]), options)]


def build_dataset(segments: list[shards.Segment], stages: list[Stage], config: JobConfig, gate, device_faults=None,
                  source: inputs.Source | None = None):
    """The streaming dataset of the segments' rows through every stage, written in the cluster; yields receipts.
    ``source``: the input's kind (``Plan.source``; None: SA-1B tars)."""
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
        exclude=exclude.load(config.input.exclude, config.s3),  # read once here, sent to every reader
        source=source,
    )
    ds = ray.data.from_items([{"segment": segment.to_json()} for segment in segments], override_num_blocks=len(segments))
    # local tars, folders and Parquet files: one segment per chunk, each its own block, so that chunks are read in
    # parallel tasks. The header scans are CPU-less tasks: unbounded, Ray would start a worker process for every
    # shard at once
    ds = ds.flat_map(_split, fn_kwargs={"options": options}, num_cpus=0,
                     compute=ray.data.TaskPoolStrategy(size=config.input.readers))
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
                                 device_faults, config.faults.broken_device_limit),
            batch_size=stage.batch_size,
            batch_format="pyarrow",
            **ray_options(stage.resources),
        )
    return ds.map_batches(units.write_parts, fn_kwargs={"out": config.output.path, "s3": config.s3},
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
        for rows in inputs.read_segment(shards.Segment.from_json(row["segment"]), options, take):
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
