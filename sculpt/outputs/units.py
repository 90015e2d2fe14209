"""Writing units: rows where they leave the last stage, then one commit per unit.

Rows are written where they come out of the last stage (``write_parts``, in the cluster); the driver only sees
receipts, and when a unit's receipts are all in it starts ``commit_unit``, which gathers the parts into the
unit's staged file, writes its marker, then moves the file among the data. A unit is committed when its marker
exists, and a reader of ``OUT/*.parquet`` sees committed units only. A rerun lists the markers and never opens a
committed chunk's input. A unit cut off by a kill has no marker; its staged file is deleted by the rerun, which
does the unit again.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sculpt import errors, schema
from sculpt.io import lease, shards, storage
from sculpt.io.storage import S3Options
from sculpt.outputs import stats
from sculpt.outputs.store import FILTER_SETTINGS, PARTS, OutputStore


class UnitWriter:
    """Collects one unit's rows (a chunk of a shard) as they arrive in any order, and commits the unit once all are in.

    Rows are deduplicated on their index in the shard, so a batch that Ray re-delivers after a retry is
    harmless. Rows stream to a temporary Parquet file in row groups of ``flush_rows``; memory stays bounded.
    """

    def __init__(self, store: OutputStore, unit: str, job: dict, flush_rows: int = 512):
        self.store, self.unit, self.job, self.flush_rows = store, unit, job, flush_rows
        self.seen: set[int] = set()
        self.expected: int | None = None
        self.end: dict | None = None  # the reader's unit_end: size, and where the shard's next chunk starts
        self.bytes_read = 0
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.file = None
        self.writer = None
        self.stats = stats.empty()
        # the filter's settings, recorded in every marker beside the figures they produced
        self.filter = next(({key: stage["params"].get(key) for key in FILTER_SETTINGS}
                            for stage in job.get("settings", {}).get("stages", [])
                            if stage.get("class") == "actors.verify.Verifier"), None)
        self.first_errors: dict[str, list[str]] = {}  # stage -> its first few error messages, for the error budget
        self.started = time.time()

    @property
    def complete(self) -> bool:
        return self.expected is not None and len(self.seen) == self.expected

    def add(self, table: pa.Table) -> None:
        ends = pc.drop_null(table["unit_end"])  # before the filter: a chunk whose images are all excluded has one
        if len(ends):  # row, index -1, that carries its end and nothing else
            self.end = ends[0].as_py()
            self.expected, self.bytes_read = self.end["size"], self.end["bytes_read"]
        fresh = []  # a row is kept once, even when a retried task's copy arrives in the same table
        for index in table["index"].to_pylist():
            fresh.append(index >= 0 and index not in self.seen)
            if fresh[-1]:
                self.seen.add(index)
        if not all(fresh):
            table = table.filter(pa.array(fresh))
        stats.merge(self.stats, stats.count(table))
        for message in pc.drop_null(table["error"]).to_pylist():
            examples = self.first_errors.setdefault(message.split(":", 1)[0], [])
            if len(examples) < 3:
                examples.append(message)
        self.buffer.append(_finish(table))
        self.buffered += table.num_rows
        if self.buffered >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer)
        self.buffer, self.buffered = [], 0
        if self.writer is None:
            self.file = storage.open_atomic(self.store.staged_uri(self.unit), self.store.s3)
            self.writer = pq.ParquetWriter(self.file.__enter__(), schema.OUTPUT_SCHEMA, compression="zstd")
        self.writer.write_table(table)

    def resume_from(self, committed: pa.Table) -> None:
        """Start from a committed unit's rows but its error rows, which are redone; the unit's size is theirs."""
        self.expected = committed.num_rows
        good = committed.filter(pc.not_equal(committed["status"], schema.ERROR)).cast(schema.OUTPUT_SCHEMA)
        missing = [pa.nulls(good.num_rows, f.type) for f in schema.TRANSIENT_FIELDS]
        self.add(pa.Table.from_arrays(good.columns + missing, schema=schema.PIPELINE_SCHEMA))

    def over_error_budget(self, max_share: float, min_errors: int) -> str | None:
        """Why this unit must not be committed — a model stage failed too many of its images — or None."""
        rows = self.stats["rows"]
        for stage, n in sorted(self.stats["errors_by_stage"].items()):
            if stage != "read" and n >= max(min_errors, 1) and n > max_share * rows:
                examples = "\n    ".join(self.first_errors.get(stage, []))
                return (f"stage {stage} failed {n} of {rows} images of unit {self.unit} (over faults.max_error_share="
                        f"{max_share:g}, at least faults.min_errors={min_errors}); not committed. First errors:\n    "
                        f"{examples}\nFix the cause (model path, device, config) and rerun; raise "
                        "faults.max_error_share or faults.min_errors if such failures are expected.")
        return None

    def abort(self) -> None:
        """Drop the unit: its temporary file goes, nothing is committed (the next run redoes the unit)."""
        writer, file, self.writer, self.file, self.buffer = self.writer, self.file, None, None, []
        if writer is not None:
            with contextlib.suppress(OSError):  # the error being handled already says what went wrong
                writer.close()
        if file is not None:
            with contextlib.suppress(OSError):
                file.__exit__(RuntimeError, None, None)  # removes the temporary file

    def commit(self) -> dict:
        if not self.complete:
            raise RuntimeError(f"unit {self.unit}: {len(self.seen)} of {self.expected} rows; not committing")
        self._flush()
        self.writer.close()
        self.file.__exit__(None, None, None)
        self.writer = self.file = None
        marker = {
            "unit": self.unit,
            "fingerprint": self.job["fingerprint"],
            "model_ids": self.job["model_ids"],
            "filter": self.filter,
            "prompts_version": self.job.get("prompts_version"),
            **({"vlm_profile": self.job["vlm_profile"]} if self.job.get("vlm_profile") else {}),
            **self.stats,
            "end": self.end,
            "excluded": shards.excluded_of(self.end),  # images input.exclude skipped: no row, counted here
            "input_bytes_read": self.bytes_read,
            "started": self.started,
            "committed": time.time(),
        }
        storage.write_atomic(self.store.marker_uri(self.unit), json.dumps(marker).encode(), self.store.s3)
        self.store.publish(self.unit)
        return marker


def _finish(table: pa.Table) -> pa.Table:
    """Pipeline rows -> output rows: transient columns dropped, processed images without objects marked empty."""
    no_objects = pc.equal(pc.fill_null(pc.list_value_length(table["objects"]), 0), 0)
    status = pc.if_else(pc.and_(pc.equal(table["status"], schema.OK), no_objects), schema.EMPTY, table["status"])
    table = table.set_column(table.schema.get_field_index("status"), "status", status)
    return table.select(schema.OUTPUT_SCHEMA.names).cast(schema.OUTPUT_SCHEMA)


# Part files: rows of units not committed yet. Under ".sculpt" so that no reader of the folder takes them for data,
# not even where a job ended with units pending (their parts stay until the next run clears them)

RECEIPT_SCHEMA = pa.schema([
    ("unit", pa.string()),
    ("part", pa.string()),  # the part file; null when the rows were not written (a transient failure)
    ("indices", pa.list_(pa.int32())),  # the rows' indices in their shard
    ("unit_end", schema.UNIT_END_TYPE),  # the reader's end of the unit, on the part holding its last rows
    ("transient_error", pa.string()),  # a row's transient fault outlasted its retries: the unit stays pending
])


def write_parts(table: pa.Table, out: str, s3: S3Options) -> pa.Table:
    """The write step, in the cluster: each unit's rows of this batch to a part file; one small receipt per part."""
    fs, root = storage.filesystem(storage.join(out, PARTS), s3)
    receipts = []
    for unit in pc.unique(table["unit"]).to_pylist():
        rows = table.filter(pc.equal(table["unit"], unit))
        reasons, ends = pc.drop_null(rows["transient_error"]), pc.drop_null(rows["unit_end"])
        receipt = {"unit": unit, "part": None, "indices": rows["index"].to_pylist(),
                   "unit_end": ends[0].as_py() if len(ends) else None,
                   "transient_error": reasons[0].as_py() if len(reasons) else None}
        if receipt["transient_error"] is None:
            part = f"{unit}/{uuid.uuid4().hex}.parquet"
            try:
                if not storage.is_s3(out):  # S3 has no folders (a marker object would outlive the unit)
                    fs.create_dir(f"{root}/{unit}", recursive=True)
                pq.write_table(rows, f"{root}/{part}", filesystem=fs, compression="zstd")
                receipt["part"] = part
            except Exception as exc:
                if not storage.is_store_fault(exc, out):
                    raise
                receipt["transient_error"] = f"write: {errors.describe(exc)}"  # the unit stays pending
        receipts.append(receipt)
    return pa.Table.from_pylist(receipts, schema=RECEIPT_SCHEMA)


class ErrorBudgetExceeded(errors.JobError):
    """A model stage failed too many images of a unit: the job stops before writing a dataset of errors."""


def commit_unit(store: OutputStore, unit: str, job: dict, parts: list[str], redo: bool = False,
                error_budget: tuple[float, int] = (1.0, 1 << 30), lease_owner: str | None = None) -> dict:
    """Gather a unit's part files into its staged Parquet file, write its marker, then move the file among the
    data (in the cluster); returns the marker.

    ``lease_owner``: the running job's lease (``sculpt.io.lease``), confirmed as still its own before the marker
    is written.

    ``redo``: the unit is committed already and the parts redo its error rows. Safe to run again (a retried task):
    once the marker is written and any of the parts is gone, it finishes the move and returns that marker. A fault
    that would not pickle reaches the driver as ``errors.Relayed``.
    """
    with errors.relayed(store.uri):
        return _commit(store, unit, job, parts, redo, error_budget, lease_owner)


def _commit(store: OutputStore, unit: str, job: dict, parts: list[str], redo: bool, error_budget: tuple[float, int],
            lease_owner: str | None) -> dict:
    fs, root = storage.filesystem(storage.join(store.uri, PARTS), store.s3)
    written = storage.read_bytes(store.marker_uri(unit), store.s3)
    marker = json.loads(written) if written else None
    ours = marker is not None and marker.get("fingerprint") == job["fingerprint"]  # else a cleared job's, landed late
    # a retried task whose first try got as far as the marker (a redo's parts go only once it is written)
    if ours and (not redo or not all(fs.get_file_info(f"{root}/{part}").is_file for part in parts)):
        store.publish(unit)
        _drop_parts(store, unit)
        return marker
    writer = UnitWriter(store, unit, job)
    try:
        if redo:
            writer.resume_from(store.read_unit(unit))
        for part in parts:
            writer.add(pq.read_table(f"{root}/{part}", filesystem=fs, schema=schema.PIPELINE_SCHEMA))
        over = writer.over_error_budget(*error_budget)
        if over:
            raise ErrorBudgetExceeded(over)
        if lease_owner is not None:
            lease.confirm(store.uri, store.s3, lease_owner)
        marker = writer.commit()
    except BaseException:
        writer.abort()
        raise
    _drop_parts(store, unit)
    return marker


def _drop_parts(store: OutputStore, unit: str) -> None:
    """Delete a committed unit's part files; what a fault leaves goes at the next run's start (``prepare``)."""
    try:
        storage.delete_tree(f"{storage.join(store.uri, PARTS)}/{unit}", store.s3)
    except Exception as exc:
        if not storage.is_store_fault(exc, store.uri):
            raise
