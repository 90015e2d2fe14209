"""input.exclude: images named by an exclusion list are skipped unread, counted, and in the job's fingerprint."""

import json
import os

import pyarrow.dataset as pads
import pytest

from sculpt import config, errors, schema
from sculpt.engine import planning, progress
from sculpt.engine.job import annotate as run_job
from sculpt.io import exclude, shards
from sculpt.outputs.store import OutputStore
from sculpt.testing import samples
from tests import helpers

# -- the list: parsing and matching ---------------------------------------------------------------------------------


def test_a_line_is_an_image_id_or_a_file_name_and_matches_by_member_name():
    found = exclude.parse("# RefCOCO's images\n12\n\n  0034  \nsa_56.jpg  # a file name\nother/sa_7.JPEG\n")
    assert found.ids == {12, 34} and found.stems == {"sa_56", "sa_7"}
    assert [key for key in ("sa_12", "./x/sa_34", "sa_56", "d/sa_7", "sa_1", "sa_120", "foo") if found.matches(key)] == [
        "sa_12", "./x/sa_34", "sa_56", "d/sa_7"]
    assert not exclude.parse("") and not exclude.Exclusions().matches("sa_1")


def test_a_line_that_is_neither_is_a_job_error_naming_it(tmp_path):
    with pytest.raises(errors.JobError, match=r"line 2: 'sa_1\.txt' is neither an image id"):
        exclude.parse("1\nsa_1.txt\n")
    for bad in ("-3", "1.5", "sa_1 sa_2.jpg"):
        with pytest.raises(errors.BadInput):
            exclude.parse(bad)
    with pytest.raises(errors.JobError, match="does not exist"):
        exclude.load(str(tmp_path / "missing.txt"))
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(errors.JobError, match="is not text"):
        exclude.load(str(tmp_path / "binary"))


def test_the_digest_is_of_the_content_not_its_order_or_comments():
    same = exclude.parse("1\nsa_2.jpg\n").digest()
    assert exclude.parse("# x\nsa_2.jpg\n001\n").digest() == same
    assert exclude.parse("1\nsa_3.jpg\n").digest() != same


# -- the reader -----------------------------------------------------------------------------------------------------


def shard(path, junk=b"this is not a jpeg" * 20_000):
    """Five images; sa_2's jpg is corrupt and large, so that reading or decoding it would show."""
    ok = helpers.encoded(helpers.photo())
    members = [m for i in range(1, 6) for m in helpers.pair(i, junk if i == 2 else ok)]
    samples.write_tar(str(path), members)
    return str(path)


def read(segment, excluded="", **options):
    batches = shards.read_segment(segment, shards.ReadOptions(batch_images=2, exclude=exclude.parse(excluded), **options))
    return [row for batch in batches for row in batch]


@pytest.mark.parametrize("name", ["sa_000001.tar", "sa_000001.tar.gz"])  # seeked past; passed over in a stream
def test_an_excluded_image_is_never_read_nor_decoded_and_keeps_its_index(tmp_path, name):
    path = shard(tmp_path / name)
    rows = read(shards.Segment(path), "2\nsa_4.jpg")
    assert [(r["index"], r["image_key"], r["status"]) for r in rows] == [
        (0, "sa_1", schema.OK), (2, "sa_3", schema.OK), (4, "sa_5", schema.OK)]  # no error row for the corrupt sa_2
    end = rows[-1]["unit_end"]
    assert end["size"] == 3 and end["next_index"] == 5 and shards.excluded_of(end) == 2
    if name.endswith(".tar"):  # sa_2's 360 kB were seeked past: its headers were read, not its data
        assert end["bytes_read"] < os.path.getsize(path) - 300_000
    assert read(shards.Segment(path))[1]["status"] == schema.ERROR  # without the list, sa_2 is an error row


def test_chunks_begin_where_they_would_without_the_list_and_resume_there(tmp_path):
    path = shard(tmp_path / "sa_000001.tar")
    plain = {r["unit"]: r["unit_end"] for r in read(shards.Segment(path, chunk_images=2)) if r["unit_end"]}
    rows = read(shards.Segment(path, chunk_images=2), "3\n4")
    ends = {r["unit"]: r["unit_end"] for r in rows if r["unit_end"]}
    keys = ("offset", "members", "index", "next_offset", "next_members", "next_index", "last")
    assert {u: {k: e[k] for k in keys} for u, e in ends.items()} == {u: {k: e[k] for k in keys} for u, e in plain.items()}
    # chunk 1 (sa_3, sa_4) is all excluded: one row of index -1 carries its end, and no image
    assert [(r["unit"], r["index"]) for r in rows] == [
        ("sa_000001-00000", 0), ("sa_000001-00000", 1), ("sa_000001-00001", -1), ("sa_000001-00002", 4)]
    assert [(e["size"], shards.excluded_of(e)) for e in ends.values()] == [(2, 0), (0, 2), (1, 0)]
    first = ends["sa_000001-00000"]
    start = shards.Position(1, first["next_offset"], first["next_members"], first["next_index"])
    again = read(shards.Segment(path, chunk_images=2, start=start), "3\n4")  # a resume, on the seekable path
    assert [(r["unit"], r["index"], r["unit_end"] and {k: r["unit_end"][k] for k in ("size", *keys)}) for r in again] == [
        (r["unit"], r["index"], r["unit_end"] and {k: r["unit_end"][k] for k in ("size", *keys)}) for r in rows[2:]]
    pieces = shards.split(shards.Segment(path, chunk_images=2))  # split knows nothing of the list: same chunks
    alone = [row for piece in pieces for row in read(piece, "3\n4")]
    assert [(r["unit"], r["index"], r["unit_end"]["size"] if r["unit_end"] else None) for r in alone] == [
        (r["unit"], r["index"], r["unit_end"]["size"] if r["unit_end"] else None) for r in rows]


# -- the job --------------------------------------------------------------------------------------------------------


def job(inputs, out, *extra):
    stage = {"name": "hold", "class": "tests.doubles:HoldGpu", "cpus": 0.5, "batch_size": 2}
    overrides = [f"input.shards={json.dumps([str(p) for p in inputs])}", f"output.path={out}",
                 f"stages={json.dumps([stage])}", "input.batch_images=2", "input.chunk_images=2", "progress_seconds=1",
                 *extra]
    cfg = config.load(None, overrides)
    return cfg, [config.build_stage(s) for s in cfg.stages]


def test_changing_the_list_changes_the_fingerprint_and_no_list_changes_nothing(sample_shards, tmp_path):
    (tmp_path / "a.txt").write_text("1\nsa_2.jpg\n")
    (tmp_path / "b.txt").write_text("sa_2.jpg\n1\n")  # the same list, elsewhere, in another order
    (tmp_path / "c.txt").write_text("1\nsa_3.jpg\n")
    prints = {name: planning.job_record(*job(sample_shards, tmp_path, f"input.exclude={tmp_path / name}"))["fingerprint"]
              for name in ("a.txt", "b.txt", "c.txt")}
    none = planning.job_record(*job(sample_shards, tmp_path))
    assert prints["a.txt"] == prints["b.txt"] != prints["c.txt"] and none["fingerprint"] not in prints.values()
    assert "exclude" not in none["settings"]["input"]  # outputs written before exclusion lists keep their fingerprint
    (tmp_path / "bad.txt").write_text("1\nnot an image\n")
    with pytest.raises(errors.JobError, match="bad.txt line 2"):
        planning.plan(*job(sample_shards, tmp_path / "out", f"input.exclude={tmp_path / 'bad.txt'}"))


def test_a_job_skips_the_listed_images_counts_them_and_resumes(local_ray, sample_shards, tmp_path):
    # 3 shards of 4 images (sa_1..sa_12), chunks of 2: sa_9 and sa_10 make shard 2's first chunk all excluded
    (tmp_path / "exclude.txt").write_text("2\nsa_7.jpg\n9\nsa_10.jpg\n404\n")
    out = tmp_path / "out"
    cfg, stages = job(sample_shards, out, f"input.exclude={tmp_path / 'exclude.txt'}")
    summary = run_job(cfg, stages)
    assert summary["committed_now"] == 6 and summary["pending"] == {}
    assert summary["excluded"] == 4 and summary["images"] == 8 and summary["errors"] == 0
    assert "4 excluded by input.exclude" in progress.describe(summary)[0]
    rows = pads.dataset(str(out), format="parquet").to_table(columns=["image_key", "index", "status"]).to_pylist()
    keys = sorted(int(r["image_key"][3:]) for r in rows)
    assert keys == [1, 3, 4, 5, 6, 8, 11, 12] and all(r["status"] == schema.EMPTY for r in rows)  # each once
    markers = {m["unit"]: m for m in OutputStore(str(out)).markers()}
    assert {unit: m["excluded"] for unit, m in markers.items() if m["excluded"]} == {
        "sa_000000-00000": 1, "sa_000001-00001": 1, "sa_000002-00000": 2}
    assert markers["sa_000002-00000"]["rows"] == 0 and markers["sa_000002-00001"]["rows"] == 2

    again = run_job(cfg, stages)  # nothing left: no chunk read or committed again
    assert again["committed_now"] == again["images"] == again["excluded"] == 0
    assert pads.dataset(str(out), format="parquet").count_rows() == 8


def test_redo_errors_keeps_excluded_images_out_and_counts_them_once(local_ray, sample_shards, tmp_path):
    (tmp_path / "exclude.txt").write_text("sa_2.jpg\n")
    broken, out = tmp_path / "broken", tmp_path / "out"
    broken.write_text("sa_1")  # sa_1 fails with a permanent error: an error row, redone below
    stage = {"name": "faulty", "class": "tests.doubles:Faulty", "cpus": 0.5, "batch_size": 2,
             "params": {"broken_file": str(broken)}}
    extra = [f"input.exclude={tmp_path / 'exclude.txt'}", f"stages={json.dumps([stage])}", "faults.min_errors=2"]
    cfg, stages = job(sample_shards[:1], out, *extra)
    assert run_job(cfg, stages)["errors"] == 1
    broken.unlink()
    cfg, stages = job(sample_shards[:1], out, *extra, "output.redo_errors=true")
    summary = run_job(cfg, stages)
    assert summary["committed_now"] == 1 and summary["images"] == 1 and summary["excluded"] == 0  # counted before
    rows = pads.dataset(str(out), format="parquet").to_table(columns=["image_key", "status"]).to_pylist()
    assert sorted((r["image_key"], r["status"]) for r in rows) == [("sa_1", "empty"), ("sa_3", "empty"), ("sa_4", "empty")]
    marker = {m["unit"]: m for m in OutputStore(str(out)).markers()}["sa_000000-00000"]
    assert marker["rows"] == 1 and marker["errors"] == 0 and marker["excluded"] == 1
