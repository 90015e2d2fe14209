"""The streaming run of a plan: the dataset's receipts go to the book of commits, then the run's summary.

What to do (segments of shards to read, committed units) is decided by ``sculpt.engine.planning``; the output is
this job's while it runs (``sculpt.engine.job.take_output`` holds its lease). The dataset (``sculpt.engine.dataset``)
streams rows through every stage and writes them to part files in the cluster; the driver receives only receipts
(unit, part file, row indices), and ``sculpt.engine.commits`` commits each unit once its receipts are all in.
"""

from __future__ import annotations

import json
import sys
import time

from sculpt import errors
from sculpt.config import JobConfig
from sculpt.engine.commits import MARKER_COUNTS, Commits
from sculpt.engine.dataset import build_dataset, start_gate
from sculpt.engine.planning import Plan
from sculpt.engine.progress import Progress, rounded
from sculpt.io import shards, storage
from sculpt.io.lease import Lease
from sculpt.outputs import report, stats
from sculpt.stage import Stage, start_device_faults


def run(config: JobConfig, stages: list[Stage], todo: Plan, lease: Lease | None) -> dict:
    """Annotate the plan's segments into the output that ``lease`` holds; returns a summary of this run.

    A unit with an image whose transient fault outlasted its retries, or whose commit failed, is left pending
    (``summary["pending"]``, unit -> why) and the others go on; a rerun does the pending ones."""
    progress = Progress(len(todo.all_shards), sum(todo.shard_done(shards.shard_name(uri), todo.committed)
                                                  for uri in todo.all_shards), config.progress_seconds)
    budget = (config.faults.max_error_share, config.faults.min_errors)
    driver_bytes = chunks_peak = 0
    commits = None
    if todo.segments:
        gate, device_faults = start_gate(config), start_device_faults()
        commits = Commits(todo, lease, progress, config.output.committers, budget, gate.release.remote)
        try:
            driver_bytes = _stream(config, stages, todo, lease, commits, gate, device_faults)
            commits.finish()
            chunks_peak = _peak(gate)
        finally:
            commits.cancel()
            _kill(gate, device_faults)
    return _summary(config, todo, commits, progress, driver_bytes, chunks_peak)


def _stream(config, stages, todo: Plan, lease: Lease | None, commits: Commits, gate, device_faults) -> int:
    """Hand every receipt of the dataset to ``commits``; returns the bytes of receipts the driver received."""
    # prefetch_batches=0: with a window, Ray Data holds each receipt back until the next one comes, and the last
    # receipts in flight would free the places that let the next chunk be read (a deadlock)
    receipts_stream = build_dataset(todo.segments, stages, config, gate, device_faults, todo.source).iter_batches(
        batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    driver_bytes = 0
    with errors.at_job_level(config.output.path, unwrap=True):  # a write task's full disk: one line
        for receipts in receipts_stream:
            if lease is not None:
                lease.check()
            driver_bytes += receipts.nbytes
            for receipt in receipts.to_pylist():
                commits.receive(receipt)
            commits.settle()
    return driver_bytes


def _peak(gate) -> int:
    import ray

    return ray.get(gate.load.remote())["peak"]


def _kill(*actors) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


def _summary(config: JobConfig, todo: Plan, commits: Commits | None, progress: Progress, driver_bytes: int,
             chunks_peak: int) -> dict:
    """This run's figures, and the whole output's statistics (also written to OUT/.sculpt/stats.json): a
    store's fault there is a warning, never the run's failure."""
    store = todo.store
    totals = commits.totals if commits else dict.fromkeys(("committed_now", *MARKER_COUNTS), 0)
    pending = commits.pending if commits else {}
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
    job_total = None
    try:
        job_total, _ = report.job_stats(store)  # every committed unit, this run's and earlier ones (reads retried)
        storage.write_atomic(store.stats_uri(),
                             json.dumps({**job_total, "derived": stats.derived(job_total)}, indent=1).encode(), config.s3)
    except Exception as exc:
        if errors.job_failure(exc, store.uri) is exc:  # not a store's fault: a bug
            raise
        # what the run committed stays committed: statistics it cannot read or write now fail nothing
        print(f"sculpt: warning: could not {'read' if job_total is None else 'write'} the output's statistics "
              f"({errors.describe(exc)}); `sculpt report {store.uri}` reads them later", file=sys.stderr, flush=True)
    if job_total is not None:
        summary["job"] = rounded({key: value for key, value in stats.derived(job_total).items() if value is not None})
    progress.print("done" if not pending else f"done; {len(pending)} unit(s) left pending, rerun to retry them")
    return summary
