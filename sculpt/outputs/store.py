"""Output units: one Parquet file per chunk of an input shard, committed atomically, a marker written last.

Layout under the output path (local or s3://)::

    sa_000000-00000.parquet          the rows of the shard's first chunk; appears whole or not at all
    .sculpt/job.json                 the job's config fingerprint, stages and model ids (first run)
    .sculpt/markers/sa_000000-00000.json
                                     written after the Parquet file: counts and statistics (sculpt/outputs/stats.py),
                                     where the shard's next chunk starts (``end``), fingerprint, model ids, timings
    .sculpt/stats.json               the whole job's statistics, rewritten at the end of each run
    _lease.json                      while a job writes the output (sculpt/io/lease.py)
    _tmp/, .sculpt/_tmp/             while a job writes: in-flight writes (``.sculpt/_tmp/parts/<unit>/``: rows
                                     written in the cluster, awaiting their unit's commit); garbage after a kill,
                                     cleared by the next run; what is left empty goes at the job's end (``tidy``)

Only the data files are visible to a reader of the folder: pyarrow, pandas and Spark skip names starting with
``_`` or ``.``, Hugging Face ``datasets`` (``load_dataset("parquet", data_dir=OUT)``) those starting with ``.``,
hence ``.sculpt/`` for what outlives a job. An output begun by an older sculpt (``LEGACY``: ``_sculpt_job.json``,
``_markers/``, ``_stats.json``) is read, and resumed, in its own layout.

Rows are written where they come out of the last stage (``write_parts``, in the cluster); the driver only sees
receipts, and when a unit's receipts are all in it starts ``commit_unit``, which gathers the parts into the
unit's file and writes its marker. A unit is committed when its marker exists. A rerun lists the markers and
never opens a committed chunk's input. A unit cut off by a kill has no marker; its Parquet path is deterministic,
so the rerun replaces it rather than adding a second copy of any row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sculpt import errors, schema
from sculpt.io import lease, storage
from sculpt.outputs import stats
from sculpt.io.storage import S3Options

BOOKKEEPING = ".sculpt"  # what outlives a job besides its data: no Parquet reader looks into a "."-folder
JOB_FILE = f"{BOOKKEEPING}/job.json"
MARKERS = f"{BOOKKEEPING}/markers"
STATS_FILE = f"{BOOKKEEPING}/stats.json"
LAYOUT = {"job": JOB_FILE, "markers": MARKERS, "stats": STATS_FILE}
LEGACY = {"job": "_sculpt_job.json", "markers": "_markers", "stats": "_stats.json"}  # outputs of older sculpt


class IncompatibleOutput(errors.JobError):
    pass


FILTER_SETTINGS = ("threshold", "margin", "negative_area", "semantic", "prefix")


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old, new, path="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{path}.{k}" if path else k)]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path or 'settings'}: {old!r} in the output, {new!r} now"]


class OutputStore:
    def __init__(self, uri: str, s3: S3Options = S3Options()):
        self.uri, self.s3 = uri.rstrip("/"), s3
        self._layout: dict | None = None  # LAYOUT, or LEGACY for an output begun by an older sculpt; found once

    def layout(self) -> dict:
        """Where this output keeps its job file, markers and statistics: ``LEGACY`` when an older sculpt began it
        (its job file there and none here), else ``LAYOUT``."""
        if self._layout is None:
            legacy = (storage.read_bytes(storage.join(self.uri, JOB_FILE), self.s3) is None
                      and storage.read_bytes(storage.join(self.uri, LEGACY["job"]), self.s3) is not None)
            self._layout = LEGACY if legacy else LAYOUT
        return self._layout

    def data_uri(self, unit: str) -> str:
        return storage.join(self.uri, f"{unit}.parquet")

    def job_uri(self) -> str:
        return storage.join(self.uri, self.layout()["job"])

    def stats_uri(self) -> str:
        """The whole job's statistics, rewritten at the end of each run."""
        return storage.join(self.uri, self.layout()["stats"])

    def markers_uri(self) -> str:
        return storage.join(self.uri, self.layout()["markers"])

    def marker_uri(self, unit: str) -> str:
        return storage.join(self.markers_uri(), f"{unit}.json")

    def committed(self) -> set[str]:
        """Units whose marker exists: one listing, no input or data file read."""
        return {name[: -len(".json")] for name in storage.list_names(self.markers_uri(), self.s3, ".json")}

    def job(self) -> dict | None:
        data = storage.read_bytes(self.job_uri(), self.s3)
        return json.loads(data) if data else None

    def replaces(self, job: dict, overwrite: bool = False) -> bool:
        """Whether this job would delete what the output holds (``overwrite`` of another config's output); refuses
        another config's output without it. Reads only."""
        existing = self.job()
        # another job's output, or one whose job file is gone (a clear killed part-way); the same config's output
        # is resumed even with overwrite, so that rerunning the very command that started a job never wipes it
        another = existing is None or existing["fingerprint"] != job["fingerprint"]
        # only units can be mixed up; a job file alone (a run refused before its first commit) cannot
        if another and not overwrite and (self.committed() or storage.list_names(self.uri, self.s3, ".parquet")):
            if existing is None:
                raise IncompatibleOutput(
                    f"{self.uri} holds Parquet files but no sculpt job file (another tool's, or a sculpt output whose "
                    "deletion was stopped): choose another output path, or pass --overwrite to delete them.")
            changes = _differences(existing["settings"], job["settings"])
            raise IncompatibleOutput(
                f"{self.uri} holds output of a different config (fingerprint {existing['fingerprint']}, now "
                f"{job['fingerprint']}):\n  " + "\n  ".join(changes[:8]) + "\nRerun with the same config to resume, "
                "choose another output path, or pass --overwrite to delete that output and start over."
            )
        return another and overwrite

    def prepare(self, job: dict, overwrite: bool = False) -> set[str]:
        """Make the output this job's (the caller holds its lease): wipe another config's output with ``overwrite``,
        clear what a killed run left and write the job file; returns the committed units."""
        if self.replaces(job, overwrite):
            self.clear()
        for folder in _TEMPORARY:  # a killed run's half-written files, this sculpt's or an older one's
            storage.delete_tree(storage.join(self.uri, folder), self.s3)
        storage.abort_uploads(self.uri, self.s3)  # and its unfinished S3 uploads
        storage.write_atomic(self.job_uri(), json.dumps(job, indent=1).encode(), self.s3)
        return self.committed()

    def tidy(self) -> None:
        """At the job's end (its lease still held): remove the temporary folders it left empty, so that only the
        output's own files stay. Local disks only: S3 has no folders (and sculpt writes no "folder" objects)."""
        if storage.is_s3(self.uri):
            return
        # deepest first; a folder not there, or not empty (a pending unit's parts), stays as it is
        for folder in (PARTS, *_TEMPORARY, LEGACY["markers"], BOOKKEEPING):  # ".sculpt" of a legacy output
            with contextlib.suppress(OSError):
                os.rmdir(storage.join(self.uri, folder))

    def clear(self) -> None:
        """Delete what sculpt wrote here, and only that: the markers first and the job file last, so that a clear
        stopped part-way leaves no unit that looks committed, and is refused as another job's output."""
        for folder in (MARKERS, LEGACY["markers"], storage.TMP_DIR):
            storage.delete_tree(storage.join(self.uri, folder), self.s3)
        names = storage.list_names(self.uri, self.s3)
        _delete(self.uri, [n for n in names if n.endswith(".parquet")], self.s3)
        _delete(self.uri, [n for n in names if n in (LEGACY["stats"], LEGACY["job"])], self.s3)
        storage.delete_tree(storage.join(self.uri, BOOKKEEPING), self.s3)  # job file, statistics
        self._layout = LAYOUT  # what this sculpt writes next

    def read_unit(self, unit: str, columns: list[str] | None = None) -> pa.Table:
        fs, path = storage.filesystem(self.data_uri(unit), self.s3)
        return pq.read_table(path, filesystem=fs, columns=columns)

    def markers(self) -> list[dict]:
        units = sorted(self.committed())
        with ThreadPoolExecutor(16) as pool:
            return [json.loads(data) for data in pool.map(lambda u: storage.read_bytes(self.marker_uri(u), self.s3), units) if data]


# Where atomic writes and part files go while a job runs, this sculpt's and an older one's, deepest first
_TEMPORARY = (f"{MARKERS}/{storage.TMP_DIR}", f"{BOOKKEEPING}/{storage.TMP_DIR}",
              f"{LEGACY['markers']}/{storage.TMP_DIR}", storage.TMP_DIR)


def _delete(uri: str, names: list[str], s3: S3Options) -> None:
    """Delete these files of the folder ``uri`` (on S3 with boto3: pyarrow's delete leaves a "folder" object)."""
    if not names:
        return
    if storage.is_s3(uri):
        client, (bucket, prefix) = storage.s3_client(s3), storage.bucket_key(uri + "/")
        for start in range(0, len(names), 1000):
            keys = [{"Key": prefix + name} for name in names[start:start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        return
    fs, path = storage.filesystem(uri, s3)
    for name in names:
        fs.delete_file(f"{path}/{name}")


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
        fresh = []  # a row is kept once, even when a retried task's copy arrives in the same table
        for index in table["index"].to_pylist():
            fresh.append(index >= 0 and index not in self.seen)
            if fresh[-1]:
                self.seen.add(index)
        if not all(fresh):
            table = table.filter(pa.array(fresh))
        stats.merge(self.stats, stats.count(table, self.filter and self.filter["threshold"]))
        for message in pc.drop_null(table["error"]).to_pylist():
            examples = self.first_errors.setdefault(message.split(":", 1)[0], [])
            if len(examples) < 3:
                examples.append(message)
        ends = pc.drop_null(table["unit_end"])
        if len(ends):
            self.end = ends[0].as_py()
            self.expected, self.bytes_read = self.end["size"], self.end["bytes_read"]
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
            self.file = storage.open_atomic(self.store.data_uri(self.unit), self.store.s3)
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
            **self.stats,
            "end": self.end,
            "input_bytes_read": self.bytes_read,
            "started": self.started,
            "committed": time.time(),
        }
        storage.write_atomic(self.store.marker_uri(self.unit), json.dumps(marker).encode(), self.store.s3)
        return marker


def _finish(table: pa.Table) -> pa.Table:
    """Pipeline rows -> output rows: transient columns dropped, processed images without objects marked empty."""
    no_objects = pc.equal(pc.fill_null(pc.list_value_length(table["objects"]), 0), 0)
    status = pc.if_else(pc.and_(pc.equal(table["status"], schema.OK), no_objects), schema.EMPTY, table["status"])
    table = table.set_column(table.schema.get_field_index("status"), "status", status)
    return table.select(schema.OUTPUT_SCHEMA.names).cast(schema.OUTPUT_SCHEMA)


# Part files: rows of units not committed yet. Under ".sculpt" so that no reader of the folder takes them for data,
# not even where a job ended with units pending (their parts stay until the next run clears them)
PARTS = f"{BOOKKEEPING}/{storage.TMP_DIR}/parts"

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
    """Gather a unit's part files into its Parquet file and write its marker (in the cluster); returns the marker.

    ``lease_owner``: the running job's lease (``sculpt.io.lease``), confirmed as still its own before anything is
    written to the unit's final names.

    ``redo``: the unit is committed already and the parts redo its error rows. Safe to run again (a retried task):
    once the marker is written and any of the parts is gone, it returns that marker.
    """
    fs, root = storage.filesystem(storage.join(store.uri, PARTS), store.s3)
    written = storage.read_bytes(store.marker_uri(unit), store.s3)
    marker = json.loads(written) if written else None
    ours = marker is not None and marker.get("fingerprint") == job["fingerprint"]  # else a cleared job's, landed late
    # a retried task whose first try got as far as the marker (a redo's parts go only once it is written)
    if ours and (not redo or not all(fs.get_file_info(f"{root}/{part}").is_file for part in parts)):
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


def shard_progress(markers: list[dict]) -> dict[str, dict]:
    """Shard -> its committed chunks, their images, and whether it is done (every chunk up to its last)."""
    from sculpt.io.shards import parse_unit

    found: dict[str, dict] = {}
    for marker in markers:
        shard, chunk = parse_unit(marker["unit"])
        entry = found.setdefault(shard, {"chunks": set(), "images": 0, "last": None})
        entry["chunks"].add(chunk)
        entry["images"] += marker["images"]
        if (marker.get("end") or {}).get("last"):
            entry["last"] = chunk
    return {shard: {"chunks": len(e["chunks"]), "images": e["images"],
                    "done": e["last"] is not None and e["chunks"] == set(range(e["last"] + 1))}
            for shard, e in sorted(found.items())}


def shards_line(job: dict, markers: list[dict]) -> str:
    """'2/3 done (7 chunks committed)'."""
    done = sum(p["done"] for p in shard_progress(markers).values())
    return f"{done}/{job.get('total_shards', '?')} done ({len(markers)} chunks committed)"
