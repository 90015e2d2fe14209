"""Output units: one Parquet file per chunk of an input shard, committed atomically, a marker written last.

Layout under the output path (local or s3://)::

    sa_000000-00000.parquet          the rows of the shard's first chunk; appears whole or not at all
    .sculpt/job.json                 the job's config fingerprint, stages and model ids (first run)
    .sculpt/markers/sa_000000-00000.json
                                     written after the Parquet file: counts and statistics (sculpt/outputs/stats.py),
                                     where the shard's next chunk starts (``end``), fingerprint, model ids, timings
    .sculpt/stats.json               the whole job's statistics, rewritten at the end of each run
    .sculpt/staged/sa_000000-00000.parquet
                                     a unit's rows between their upload and their marker: moved to the top once
                                     the marker is written, so that a reader of ``*.parquet`` sees committed units only
    _lease.json                      while a job writes the output (sculpt/io/lease.py)
    _tmp/, .sculpt/_tmp/             while a job writes: in-flight writes (``.sculpt/_tmp/parts/<unit>/``: rows
                                     written in the cluster, awaiting their unit's commit); garbage after a kill,
                                     cleared by the next run; what is left empty goes at the job's end (``tidy``)

Only the data files are visible to a reader of the folder: pyarrow, pandas and Spark skip names starting with
``_`` or ``.``, Hugging Face ``datasets`` (``load_dataset("parquet", data_dir=OUT)``) those starting with ``.``,
hence ``.sculpt/`` for what outlives a job. An output begun by an older sculpt (``LEGACY``: ``_sculpt_job.json``,
``_markers/``, ``_stats.json``) is read, and resumed, in its own layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from sculpt import errors
from sculpt.io import storage
from sculpt.io.storage import S3Options

BOOKKEEPING = ".sculpt"  # what outlives a job besides its data: no Parquet reader looks into a "."-folder
JOB_FILE = f"{BOOKKEEPING}/job.json"
MARKERS = f"{BOOKKEEPING}/markers"
STATS_FILE = f"{BOOKKEEPING}/stats.json"
PARTS = f"{BOOKKEEPING}/{storage.TMP_DIR}/parts"  # rows written in the cluster, awaiting their unit's commit
STAGED = f"{BOOKKEEPING}/staged"  # a unit's Parquet file until its marker is written (``publish`` moves it up)
LAYOUT = {"job": JOB_FILE, "markers": MARKERS, "stats": STATS_FILE}
LEGACY = {"job": "_sculpt_job.json", "markers": "_markers", "stats": "_stats.json"}  # outputs of older sculpt


class IncompatibleOutput(errors.JobError):
    pass


FILTER_SETTINGS = ("threshold", "margin", "listener_threshold", "negative_area", "min_words", "max_words",
                   "duplicate_similarity", "semantic", "prefix", "reasoning_threshold")


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

    def staged_uri(self, unit: str) -> str:
        return storage.join(self.uri, STAGED, f"{unit}.parquet")

    def publish(self, unit: str) -> None:
        """Move a committed unit's staged Parquet file to its place among the data, if it is still staged (a local
        rename; one server-side copy on S3: the file appears whole)."""
        fs, staged = storage.filesystem(self.staged_uri(unit), self.s3)
        if fs.get_file_info(staged).is_file:
            storage.move(self.staged_uri(unit), self.data_uri(unit), self.s3)

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
        committed = self.committed()
        self._finish_commits(committed)
        return committed

    def _finish_commits(self, committed: set[str]) -> None:
        """A kill between a unit's marker and its move left it staged: move it up; a staged file without a marker
        is a commit that never happened: delete it."""
        staged = [name[: -len(".parquet")] for name in storage.list_names(storage.join(self.uri, STAGED), self.s3, ".parquet")]
        for unit in staged:
            if unit in committed:
                self.publish(unit)
        _delete(storage.join(self.uri, STAGED), [f"{unit}.parquet" for unit in staged if unit not in committed], self.s3)

    def tidy(self) -> None:
        """At the job's end (its lease still held): remove the temporary folders it left empty, so that only the
        output's own files stay. Local disks only: S3 has no folders (and sculpt writes no "folder" objects)."""
        if storage.is_s3(self.uri):
            return
        # deepest first; a folder not there, or not empty (a pending unit's parts), stays as it is
        for folder in (PARTS, *_TEMPORARY, STAGED, LEGACY["markers"], BOOKKEEPING):  # ".sculpt" of a legacy output
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
_TEMPORARY = (f"{MARKERS}/{storage.TMP_DIR}", f"{STAGED}/{storage.TMP_DIR}", f"{BOOKKEEPING}/{storage.TMP_DIR}",
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


def shard_done(chunks: set[int], last: int | None) -> bool:
    """The one rule of a finished shard: its last chunk (the one whose marker says so) and every chunk before it
    are committed."""
    return last is not None and chunks >= set(range(last + 1))


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
                    "done": shard_done(e["chunks"], e["last"])}
            for shard, e in sorted(found.items())}


def shards_line(job: dict, markers: list[dict]) -> str:
    """'2/3 done (7 chunks committed)'."""
    done = sum(p["done"] for p in shard_progress(markers).values())
    return f"{done}/{job.get('total_shards', '?')} done ({len(markers)} chunks committed)"
