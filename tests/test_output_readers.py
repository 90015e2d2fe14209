"""What a finished output holds, and who can read it: only the data files and sculpt's bookkeeping (``.sculpt/``)
stay; pyarrow, Hugging Face ``datasets`` over the folder and the oldest pyarrow sculpt declares all read it."""

import json
import os
import re
import subprocess

import boto3
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from sculpt import config, schema
from sculpt.io import storage
from sculpt.io.lease import LEASE_FILE, Lease, OutputBusy
from sculpt.outputs.store import LEGACY, OutputStore
from sculpt.outputs.units import UnitWriter, commit_unit, write_parts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = {"fingerprint": "f1", "settings": {"stages": []}, "model_ids": {}}
MASK = {"size": [3, 4], "counts": "0<"}


def listing(out) -> set[str]:
    """Every file and folder under ``out``, relative."""
    return {os.path.relpath(os.path.join(top, name), out) for top, folders, files in os.walk(out)
            for name in folders + files}


def unit_rows(unit: str, size: int) -> pa.Table:
    """A unit's rows as the last stage hands them on, with every kind of value the output holds: objects with and
    without a box (a negative), groups, spans, an error row."""
    rows = []
    for i in range(size):
        objects = [schema.new_object(phrase="dog", phrase_start=4, phrase_end=7, box=[1, 2, 3.5, 4], mask=MASK, area=5,
                                     mask_score=0.9, expression="the dog", expression_words=2, iou=0.8, rival_iou=0.1,
                                     verifier_area=5, verifier_mask=MASK, kept=True, category="single"),
                   schema.new_object(phrase="two dogs", box=[0, 0, 4, 3], mask=MASK, category="multi", members=[0, 0]),
                   schema.new_object(phrase="a cat", expression="the cat", box=None, mask=None, area=0, kept=True,
                                     verifier_area=0, category="negative")]
        row = schema.new_row(unit.split("-")[0], i, f"sa_{i}", image_bytes=b"x", image_id=i, file_name=f"sa_{i}.jpg",
                             width=4, height=3, unit=unit, caption="the dog and two dogs",
                             grounded_caption=[{"start": 4, "end": 7, "objects": [0]}], objects=objects,
                             source_annotations="{}")
        if i == 1:
            schema.mark_error(row, "ground", "RuntimeError: no")
        row["unit_end"] = {"size": size, "bytes_read": 100} if i == size - 1 else None
        rows.append(row)
    return schema.to_table(rows)


def commit(store: OutputStore, unit: str, size: int = 3) -> dict:
    (receipt,) = write_parts(unit_rows(unit, size), store.uri, store.s3).to_pylist()
    return commit_unit(store, unit, JOB, [receipt["part"]])


def tiny_job(inputs, out):
    stages = [{"name": "hold", "class": "tests.doubles:HoldGpu", "gpus": 0.5, "params": {}},
              {"name": "m", "class": "tests.doubles:ThresholdMasker", "gpus": 0.25, "cpus": 0.5}]
    cfg = config.load(None, [f"input.shards={json.dumps([str(p) for p in inputs])}", f"output.path={out}",
                             f"stages={json.dumps(stages)}", "input.batch_images=2", "progress_seconds=1"])
    return cfg, [config.build_stage(s) for s in cfg.stages]


def test_a_finished_or_refused_job_leaves_only_its_output_which_datasets_loads_from_the_folder(local_ray, sample_shards,
                                                                                                tmp_path):
    datasets = pytest.importorskip("datasets")
    from sculpt.engine.job import annotate as run_job

    out = tmp_path / "out"
    cfg, stages = tiny_job(sample_shards, out)
    assert run_job(cfg, stages)["committed_now"] == 3
    units = [f"sa_00000{i}-00000" for i in range(3)]
    finished = {*(f"{u}.parquet" for u in units), ".sculpt", ".sculpt/job.json", ".sculpt/stats.json",
                ".sculpt/markers", *(f".sculpt/markers/{u}.json" for u in units)}
    assert listing(out) == finished  # no lock file, no empty temporary folder

    held = Lease(str(out)).acquire()  # another job writes the output: this one is refused
    with pytest.raises(OutputBusy, match="another job is writing this output"):
        run_job(cfg, stages)
    assert listing(out) == finished | {LEASE_FILE}  # the other job's lease, nothing of the refused one
    held.release()
    assert listing(out) == finished
    assert run_job(cfg, stages)["committed_now"] == 0 and listing(out) == finished  # a rerun with nothing left

    # the plain call: every file under the folder that datasets does not skip is one of the units
    loaded = datasets.load_dataset("parquet", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    table = pads.dataset(str(out), format="parquet").to_table()
    assert loaded.num_rows == table.num_rows == 12
    assert sorted(zip(loaded["shard"], loaded["index"])) == sorted(zip(table["shard"].to_pylist(),
                                                                       table["index"].to_pylist()))
    assert sum(len(objects) for objects in loaded["objects"]) == sum(len(o) for o in table["objects"].to_pylist()) > 0


def test_an_s3_output_ends_with_its_files_only_and_no_folder_or_empty_objects(s3_server, tmp_path):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="readers")
    s3, out = storage.S3Options(endpoint=s3_server), "s3://readers/out"

    def objects():
        return {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket="readers").get("Contents", [])}

    lease = Lease(out, s3).acquire()
    store = OutputStore(out, s3)
    store.prepare(JOB)
    commit(store, "sa_000001-00000")
    write_parts(unit_rows("sa_000002-00000", 2)[:1], store.uri, store.s3)  # a unit left pending: its part stays
    storage.write_atomic(store.stats_uri(), b"{}", s3)
    assert lease.renew()
    store.tidy()
    lease.release()
    left = objects()
    part = [key for key in left if "/_tmp/parts/" in key]
    assert set(left) - set(part) == {"out/sa_000001-00000.parquet", "out/.sculpt/job.json", "out/.sculpt/stats.json",
                                     "out/.sculpt/markers/sa_000001-00000.json"}
    assert [key.split("/")[:4] for key in part] == [["out", ".sculpt", "_tmp", "parts"]]  # where no reader looks
    assert all(size > 0 for size in left.values()), left  # no "folder" object, no empty lease or lock

    lease = Lease(out, s3).acquire()  # another config takes the output over: the old one deleted to the last file
    store = OutputStore(out, s3)
    store.prepare({**JOB, "fingerprint": "f2"}, overwrite=True)
    store.tidy()
    lease.release()
    assert objects() == {"out/.sculpt/job.json": len(json.dumps({**JOB, "fingerprint": "f2"}, indent=1))}


def test_an_output_an_older_sculpt_began_is_read_and_resumed_in_its_own_layout(tmp_path):
    """``_sculpt_job.json``, ``_markers/``, ``_stats.json`` and fixed-size boxes: sculpt reads them, resumes the output
    where they are (no file moves) and reads its old and new units together."""
    out = tmp_path / "out"
    store = OutputStore(str(out))
    store.prepare(JOB)
    commit(store, "sa_000001-00000")
    store.tidy()
    # now as an older sculpt left it: its bookkeeping names, its box type (fixed_size_list<float32>[4]) and no
    # reject_reason, listener_iou or instances
    (out / ".sculpt" / "job.json").rename(out / LEGACY["job"])
    (out / ".sculpt" / "markers").rename(out / LEGACY["markers"])
    (out / LEGACY["stats"]).write_text("{}")
    (out / ".sculpt").rmdir()
    old_types = pa.schema([field if field.name != "objects" else field.with_type(pa.list_(pa.struct(
        [f if f.name != "box" else f.with_type(pa.list_(pa.float32(), 4)) for f in schema.OBJECT_TYPE
         if f.name not in ("reject_reason", "listener_iou", "instances")])))
        for field in schema.OUTPUT_SCHEMA])
    old = pq.read_table(out / "sa_000001-00000.parquet").cast(old_types)
    pq.write_table(old, out / "sa_000001-00000.parquet")

    store = OutputStore(str(out))
    assert store.layout() == LEGACY and store.job()["fingerprint"] == "f1"
    assert store.committed() == {"sa_000001-00000"} and [m["unit"] for m in store.markers()] == ["sa_000001-00000"]
    assert store.prepare(JOB) == {"sa_000001-00000"}  # the same job resumes it
    commit(store, "sa_000002-00000")
    redo = UnitWriter(store, "sa_000001-00000", JOB)
    redo.resume_from(store.read_unit("sa_000001-00000"))  # an old unit's rows, its error row to be redone
    assert redo.seen == {0, 2}
    store.tidy()
    assert listing(out) == {"sa_000001-00000.parquet", "sa_000002-00000.parquet", LEGACY["job"], LEGACY["stats"],
                            LEGACY["markers"], *(f"{LEGACY['markers']}/sa_00000{i}-00000.json" for i in (1, 2))}
    assert store.stats_uri().endswith("/_stats.json")
    rows = pads.dataset(str(out), format="parquet").to_table().to_pylist()
    assert len(rows) == 6 and {tuple(o["box"] or ()) for r in rows for o in r["objects"] or []} == {
        (1, 2, 3.5, 4), (0, 0, 4, 3), ()}

    store.prepare({**JOB, "fingerprint": "f2"}, overwrite=True)  # another config: old names go, new ones come
    store.tidy()
    assert listing(out) == {".sculpt", ".sculpt/job.json"} and store.layout()["job"] == ".sculpt/job.json"


FLOOR_READER = r"""
import json, sys
import pyarrow, pyarrow.dataset as ds, pyarrow.parquet as pq
out = sys.argv[1]
files = {name: pq.read_table(f"{out}/{name}").to_pylist() for name in sorted(sys.argv[2:])}
folder = ds.dataset(out, format="parquet").to_table().to_pylist()
print(json.dumps({"version": pyarrow.__version__, "files": files, "folder": folder}))
"""


def declared_pyarrow_floor() -> str:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return re.search(r'"pyarrow>=([0-9.]+)"', f.read()).group(1)


def test_the_oldest_pyarrow_sculpt_declares_reads_its_output(tmp_path):
    """pyproject.toml declares pyarrow>=N: pyarrow N reads every column of a unit (a negative's null box too) and
    the folder as a dataset. The reader runs in a virtual environment of its own with pyarrow N (``make install``
    makes .venv/pyarrow-floor; SCULPT_PYARROW_FLOOR_PYTHON names another interpreter)."""
    python = os.environ.get("SCULPT_PYARROW_FLOOR_PYTHON") or os.path.join(ROOT, ".venv", "pyarrow-floor", "bin", "python")
    floor = declared_pyarrow_floor()
    if not os.path.exists(python):
        pytest.skip(f"no interpreter with pyarrow=={floor} at {python} (`make install` makes it there, with pip "
                    "access; or set SCULPT_PYARROW_FLOOR_PYTHON)")
    out = tmp_path / "out"
    store = OutputStore(str(out))
    store.prepare(JOB)
    commit(store, "sa_000001-00000")
    commit(store, "sa_000002-00000", size=2)
    names = sorted(p.name for p in out.glob("*.parquet"))
    done = subprocess.run([python, "-c", FLOOR_READER, str(out), *names], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    read = json.loads(done.stdout)
    assert read["version"].split(".")[: len(floor.split("."))] == floor.split("."), (read["version"], floor)

    def plain(rows):  # as JSON carries them
        return json.loads(json.dumps(rows))

    for name in names:
        assert read["files"][name] == plain(pq.read_table(out / name).to_pylist()), name
    assert read["folder"] == plain(pads.dataset(str(out), format="parquet").to_table().to_pylist())
    negatives = [o for rows in read["files"].values() for r in rows for o in r["objects"] or []
                 if o["category"] == "negative"]
    assert negatives and all(o["box"] is None for o in negatives)
