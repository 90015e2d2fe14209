"""The driver's book of units: receipts come in from the dataset, a unit whose rows are all written is committed by
a task in the cluster (``sculpt.outputs.units.commit_unit``: Parquet, then marker), and a unit that cannot be
finished is left pending for the next run."""

from __future__ import annotations

from sculpt import errors
from sculpt.engine.planning import Plan
from sculpt.engine.progress import Progress
from sculpt.io import shards
from sculpt.io.lease import Lease
from sculpt.outputs import units

# a unit's counts that the run summary adds up
MARKER_COUNTS = ("images", "rows", "errors", "excluded", "input_bytes_read")


class Received:
    """A unit's receipts so far: its part files and the row indices they hold."""

    def __init__(self):
        self.parts: list[str] = []
        self.seen: set[int] = set()
        self.expected: int | None = None


class Commits:
    """Receipts in, commit tasks out, at most ``committers`` at once; what ended how is kept for the summary.

    ``release(unit)`` is called once a unit needs no place among the chunks in flight any more (``ChunkGate``)."""

    def __init__(self, todo: Plan, lease: Lease | None, progress: Progress, committers: int, budget: tuple, release):
        import ray

        self.todo, self.lease, self.progress, self.committers, self.release = todo, lease, progress, committers, release
        self.commit = ray.remote(units.commit_unit).options(num_cpus=0)
        self.budget = budget
        self.committed = set(todo.committed)
        self.totals = dict.fromkeys(("committed_now", *MARKER_COUNTS), 0)  # over this run's commits
        self.pending: dict[str, str] = {}  # unit -> why it is left for the next run
        self.received: dict[str, Received] = {}
        self.finished: set[str] = set()  # units whose rows are all in: later receipts for them are repeats
        self.in_flight: dict = {}  # commit task -> its unit

    def receive(self, receipt: dict) -> None:
        unit = receipt["unit"]
        if unit in self.pending or unit in self.finished:
            self.release(unit)  # a task Ray ran again may have taken its place anew
            return  # rows still arriving for a unit given up on, or again for one complete
        if receipt["transient_error"]:
            self.received.pop(unit, None)
            self._leave_pending(unit, receipt["transient_error"])
            self.release(unit)
            return
        got = self.received.setdefault(unit, Received())
        fresh = {index for index in receipt["indices"] if index >= 0} - got.seen  # -1: a row carrying only the end
        got.parts.append(receipt["part"])
        got.seen |= fresh
        self.progress.rows(len(fresh))
        if receipt["unit_end"]:
            got.expected = len(self.todo.redo[unit]) if unit in self.todo.redo else receipt["unit_end"]["size"]
        if got.expected is not None and len(got.seen) >= got.expected:
            self._start(unit, got)

    def _start(self, unit: str, got: Received) -> None:
        # commits are CPU-less tasks: unbounded, Ray would start a worker process for each at once
        self.settle(wait_for=len(self.in_flight) + 1 - self.committers)
        if self.lease is not None:
            self.lease.check()  # settling may have taken long: no commit starts on a stale lease
        owner = self.lease.record["owner"] if self.lease is not None else None
        ref = self.commit.remote(self.todo.store, unit, self.todo.job, got.parts, unit in self.todo.redo, self.budget, owner)
        self.in_flight[ref] = unit
        del self.received[unit]
        self.finished.add(unit)
        self.release(unit)

    def settle(self, wait_for: int = 0) -> None:
        """Take in the commits that have finished, once ``wait_for`` of them have."""
        import ray

        if not self.in_flight:
            return
        if wait_for > 0:
            ray.wait(list(self.in_flight), num_returns=min(wait_for, len(self.in_flight)))
        done, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=0)
        for ref in done:
            unit = self.in_flight.pop(ref)
            try:
                marker = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the commit's error, or its worker's death past retries
                cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
                if not errors.is_transient(cause, self.todo.store.uri):
                    raise errors.job_failure(cause, self.todo.store.uri) from None  # a full disk, an error budget
                self._leave_pending(unit, f"write: {errors.describe(cause)}")  # the store, past its own retries
                continue
            self._count(unit, marker)

    def _count(self, unit: str, marker: dict) -> None:
        self.totals["committed_now"] += 1
        # a redone chunk: this run processed its error rows only
        counts = {**marker, "images": len(self.todo.redo[unit]), "excluded": 0} if unit in self.todo.redo else marker
        for key in MARKER_COUNTS:
            self.totals[key] += counts.get(key, 0)
        shard, chunk = shards.parse_unit(unit)
        was_done = self.todo.shard_done(shard, self.committed)  # a redone chunk's shard was counted before
        self.committed.add(unit)
        if marker["end"]["last"]:
            self.todo.last_chunks[shard] = chunk
        self.progress.unit(marker, not was_done and self.todo.shard_done(shard, self.committed))

    def _leave_pending(self, unit: str, why: str) -> None:
        self.pending[unit] = why
        self.progress.print(f"left {unit} pending: {why}")

    def finish(self) -> None:
        """Wait for every commit; a unit whose rows never all came is a bug, not a fault."""
        self.settle(wait_for=len(self.in_flight))
        if self.received:
            missing = {unit: f"{len(got.seen)}/{got.expected}" for unit, got in self.received.items()}
            raise RuntimeError(f"the pipeline ended with incomplete units (rows seen/expected): {missing}")

    def cancel(self) -> None:
        import ray

        for ref in self.in_flight:
            ray.cancel(ref)
