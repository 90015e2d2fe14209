"""The streaming engine: chunks of shards -> reader tasks -> one fixed actor pool per stage -> write tasks -> commits.

What to do (segments of shards to read, committed units, the output's lease) is decided by ``sculpt.engine.planning``,
without Ray; this module runs it.

Ray Data streams blocks of rows through every stage at once, with backpressure (memory stays bounded by the
blocks in flight); a job-wide ``ChunkGate`` bounds the chunks read but not yet through the chain. Rows are
written to part files where they leave the last stage (``sculpt.outputs.store.write_parts``); the driver receives only
receipts (unit, part file, row indices), and when a unit's receipts are all in it starts ``commit_unit`` in the
cluster (Parquet, then marker).
"""

from __future__ import annotations

import json
import time

from sculpt import errors
from sculpt.config import JobConfig
from sculpt.engine.dataset import build_dataset, start_gate
from sculpt.engine.planning import Plan, plan
from sculpt.engine.progress import Progress, rounded
from sculpt.io import shards, storage
from sculpt.outputs import report, stats
from sculpt.outputs import store as output
from sculpt.stage import Stage, start_device_faults

STATS_FILE = "_stats.json"  # the whole job's statistics, rewritten at the end of every run
MARKER_COUNTS = ("images", "rows", "errors", "input_bytes_read")  # a unit's counts that the run summary adds up


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
    summary["job"] = rounded({key: value for key, value in stats.derived(job_total).items() if value is not None})
    progress.print("done" if not pending else f"done; {len(pending)} unit(s) left pending, rerun to retry them")
    return summary
