"""Inputs besides SA-1B tars (sculpt/io/inputs.py): a folder of images, WebDataset tars, Parquet files; each read
in chunks with stable keys and error rows, through a driver kill and resume exactly once, and exported again."""

import json
import os
import signal
import subprocess
import sys
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sculpt import cli, config, errors
from sculpt.annotation import images, rle
from sculpt.engine.job import annotate as run_job
from sculpt.io import inputs, shards, storage
from sculpt.io.shards import ReadOptions, Segment
from sculpt.outputs.store import OutputStore
from sculpt.testing import samples
from tests import helpers
from tests.test_workflow import hold, output_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JPEG = samples.jpeg_bytes(helpers.photo()[:64, :80])


def read_all(uri, kind, chunk_images=1 << 30, files=None, **options):
    source, _ = inputs.find([uri], kind, source=inputs.Source(**options))
    opts = ReadOptions(source=source, batch_images=2)
    if source.kind == "images" and files is None:
        files = inputs.list_images(uri, source)
    segment = Segment(uri, chunk_images, files=files)
    return [row for piece in inputs.split(segment, opts) for batch in inputs.read_segment(piece, opts) for row in batch]


def test_the_kind_is_found_from_what_the_input_names_and_a_mix_or_an_image_file_is_refused(sample_shards, tmp_path):
    folder = samples.make_sample_inputs(str(tmp_path / "photos"), "images", images=3)
    wds = samples.make_sample_inputs(str(tmp_path / "wds"), "webdataset", images=3)
    table = samples.make_sample_inputs(str(tmp_path / "hf"), "parquet", images=3)
    found = {name: inputs.find([path], "auto")[0].kind
             for name, path in [("folder", folder), ("wds", wds), ("hf", table), ("sa1b", str(sample_shards[0]))]}
    assert found == {"folder": "images", "wds": "webdataset", "hf": "parquet", "sa1b": "sa1b"}
    assert inputs.find([folder], "auto")[1] == [folder]  # a folder is one shard, named by the folder
    (tmp_path / "wds" / "extra.jpg").write_bytes(JPEG)
    for patterns, kind, says in [([wds], "auto", "images and tar files: one kind of input a job; set input.kind"),
                                 ([folder + "/photo_0000.jpg"], "auto", "give the folder"),
                                 ([folder], "parquet", "no Parquet files")]:
        with pytest.raises(errors.BadInput, match=says):
            inputs.find(patterns, kind)
    assert inputs.find([wds], "webdataset")[0].kind == "webdataset"  # named: the images beside are not read
    with pytest.raises(errors.BadInput, match="input.id_column='nope'"):
        inputs.find([table], "parquet", source=inputs.Source(id_column="nope"))


def test_a_folder_is_read_in_chunks_of_its_sorted_listing_with_bad_files_as_error_rows(tmp_path):
    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    for name, data in [("a.jpg", JPEG), ("b/c.PNG", helpers.encoded(helpers.photo()[:30, :20], "PNG")),
                       ("b/d.webp", helpers.encoded(helpers.photo()[:10, :12], "WEBP")), ("e.jpeg", b"garbage"),
                       ("f.txt", b"not an image"), (".hidden.jpg", JPEG)]:
        (folder / name).write_bytes(data)
    listing = inputs.list_images(str(folder), inputs.Source())
    assert listing == ["a.jpg", "b/c.PNG", "b/d.webp", "e.jpeg"]
    listing.insert(1, "gone.jpg")  # listed, then deleted before it was read
    rows = read_all(str(folder), "images", chunk_images=2, files=listing)
    assert [(r["unit"], r["index"], r["image_key"], r["file_name"]) for r in rows] == [
        ("photos-00000", 0, "a", "a.jpg"), ("photos-00000", 1, "gone", "gone.jpg"),
        ("photos-00001", 2, "b/c", "b/c.PNG"), ("photos-00001", 3, "b/d", "b/d.webp"),
        ("photos-00002", 4, "e", "e.jpeg")]
    assert [(r["width"], r["height"]) for r in rows if r["status"] == "ok"] == [(80, 64), (20, 30), (12, 10)]
    assert "FileNotFoundError" in rows[1]["error"] and rows[4]["error"].startswith("read: not a readable image")
    ends = list({r["unit"]: r["unit_end"] for r in rows if r["unit_end"]}.values())
    assert [(e["offset"], e["next_offset"], e["size"], e["last"]) for e in ends] == [
        (0, 2, 2, False), (2, 4, 2, False), (4, 5, 1, True)]


def test_webdataset_samples_in_any_layout_with_optional_json_and_bad_samples_as_error_rows(tmp_path):
    cut = JPEG[: len(JPEG) // 3]
    members = [("./train/0001.jpg", JPEG), ("./train/0001.json", b'{"a": 1}'), ("./train/0001.cls", b"3"),
               ("train/0002.seg.png", helpers.encoded(helpers.photo()[:8, :8], "PNG")), ("train/0002.txt", b"x"),
               ("train/0003.json", b"{}"),  # a sample without an image
               ("train/0004.jpg", cut), ("train/0005.JPG", JPEG), ("sa_7.jpg", JPEG)]
    path = str(tmp_path / "wds-000000.tar")
    samples.write_tar(path, members)
    rows = read_all(path, "auto", chunk_images=2, image_extensions=("jpg", "png"))
    assert [(r["index"], r["image_key"], r["file_name"], r["status"]) for r in rows] == [
        (0, "train/0001", "train/0001.jpg", "ok"), (1, "train/0002", "train/0002.seg.png", "ok"),
        (2, "train/0003", "train/0003.jpg", "error"), (3, "train/0004", "train/0004.jpg", "error"),
        (4, "train/0005", "train/0005.jpg", "ok"), (5, "sa_7", "sa_7.jpg", "ok")]
    assert "has no image (.jpg, .png)" in rows[2]["error"] and "input.image_extensions" in rows[2]["error"]
    assert "image" in rows[3]["error"]
    assert [r["unit"] for r in rows] == ["wds-000000-0000" + c for c in "001122"]
    # the same tar read again from where its second chunk began: the same rows, keys and indices
    second = next(r["unit_end"] for r in rows if r["unit_end"])
    source = inputs.Source("webdataset", ("jpg", "png"))
    start = shards.Position(1, second["next_offset"], second["next_members"], second["next_index"])
    again = [r for b in inputs.read_segment(Segment(path, 2, start), ReadOptions(source=source)) for r in b]
    assert [(r["index"], r["image_key"], r["status"]) for r in again] == [
        (r["index"], r["image_key"], r["status"]) for r in rows[2:]]


def test_parquet_images_as_bytes_paths_or_hugging_face_structs_chunked_by_row_groups(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.jpg").write_bytes(JPEG)
    table = pa.table({"name": ["p0", "p1", "p2", "p3", "p4"],
                      "image": [{"bytes": JPEG, "path": "p0.jpg"}, {"bytes": None, "path": "pics/x.jpg"},
                                {"bytes": b"garbage", "path": None}, None, {"bytes": JPEG, "path": None}]})
    path = str(tmp_path / "train-00000-of-00001.parquet")
    pq.write_table(table, path, row_group_size=2)
    rows = read_all(path, "auto", chunk_images=3, id_column="name")
    assert [(r["unit"], r["index"], r["image_key"], r["file_name"], r["status"]) for r in rows] == [
        ("train-00000-of-00001-00000", 0, "p0", "p0.jpg", "ok"),
        ("train-00000-of-00001-00000", 1, "p1", "pics/x.jpg", "ok"),
        ("train-00000-of-00001-00000", 2, "p2", "p2.jpg", "error"),  # chunks of whole row groups: 4 rows
        ("train-00000-of-00001-00000", 3, "p3", "p3.jpg", "error"),
        ("train-00000-of-00001-00001", 4, "p4", "p4.jpg", "ok")]
    assert "not a readable image" in rows[2]["error"] and "no image (null)" in rows[3]["error"]
    ends = {r["unit"]: r["unit_end"] for r in rows if r["unit_end"]}.values()
    assert [(end["offset"], end["next_offset"], end["last"]) for end in ends] == [(0, 2, False), (2, 3, True)]
    plain = str(tmp_path / "plain.parquet")  # bytes in a binary column, no id column: the row's position names it
    pq.write_table(pa.table({"image": [JPEG, JPEG, JPEG]}), plain, row_group_size=1)
    assert [(r["image_key"], r["image_id"]) for r in read_all(plain, "parquet")] == [("0", 0), ("1", 1), ("2", 2)]


def _commit_ranges(kind, path, unit_end, listing):
    """The input a committed chunk was read from: (file or S3 key, start, end) of its bytes."""
    if kind == "webdataset":
        return [(path, unit_end["offset"], unit_end["next_offset"])]
    if kind == "parquet":
        meta = pq.ParquetFile(path).metadata
        ranges = []
        for group in range(unit_end["offset"], unit_end["next_offset"]):
            for c in range(meta.num_columns):
                column = meta.row_group(group).column(c)
                start = column.dictionary_page_offset or column.data_page_offset
                ranges.append((path, start, start + column.total_compressed_size))
        return ranges
    return [(name, 0, None) for name in listing[unit_end["offset"]:unit_end["next_offset"]]]


@pytest.mark.parametrize("kind", ["images", "webdataset", "parquet"])
def test_killed_driver_then_resume_reads_nothing_committed_and_exports_every_image_once(kind, local_ray, s3_server,
                                                                                       tmp_path):
    """The folder is read from S3 (moto); WebDataset and Parquet from local files."""
    source = samples.make_sample_inputs(str(tmp_path / "in"), kind, images=6, per_file=6)
    client = boto3.client("s3", endpoint_url=s3_server)
    if kind == "images":
        client.create_bucket(Bucket="photos")
        for name in inputs.list_images(source, inputs.Source()):
            client.upload_file(os.path.join(source, name), "photos", f"in/{name}")
        source = "s3://photos/in"
    out, logs, pause = tmp_path / "out", tmp_path / "logs", tmp_path / "pause"
    logs.mkdir()
    pause.touch()  # after 2 images the first stage waits: 1 or 2 of the 3 chunks are committed
    stages = [hold("slow", logs, 1, seconds=0.1, batch_size=1, pause_file=str(pause), pause_after=2),
              {"name": "refer", "class": "tests.doubles:ThresholdReferrer", "cpus": 0.5, "batch_size": 1}]
    chunked = ["input.chunk_images=2", "input.readers=1", "ray.block_bytes=1024",  # a block a batch: rows move on
               f"s3.endpoint={s3_server}"]
    address = local_ray.get_runtime_context().gcs_address  # the driver joins this Ray: its kill ends only the job
    args = ["--input", source, "--output", str(out), "--set", f"stages={json.dumps(stages)}",
            "--set", f"ray.address={address}", *[a for c in chunked for a in ("--set", c)]]
    driver = subprocess.Popen([sys.executable, os.path.join(ROOT, "workflows", "annotate.py"), *args], cwd=ROOT,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    store = OutputStore(str(out))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not store.committed() and driver.poll() is None:
        time.sleep(0.05)
    assert driver.poll() is None, driver.communicate()[1].decode()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    _, err = driver.communicate()
    pause.unlink()
    before = {m["unit"]: m for m in store.markers()}
    assert 1 <= len(before) < 3, err.decode()[-2000:]
    # Committed chunks must never be read again: their input becomes garbage in place (and a folder gains a file)
    committed_bytes, shard = 0, shards.parse_unit(next(iter(before)))[0]
    listing = inputs.read_listing(str(out), shard) if kind == "images" else None
    if kind == "images":  # recorded at the first run, nothing else beside it
        assert os.listdir(out / inputs.LISTINGS) == ["in.json"] and len(listing) == 6
    path = os.path.join(source, shard + (".tar" if kind == "webdataset" else ".parquet"))
    for marker in before.values():
        for file, start, end in _commit_ranges(kind, path, marker["end"], listing):
            if kind == "images":
                size = client.head_object(Bucket="photos", Key=f"in/{file}")["ContentLength"]
                client.put_object(Bucket="photos", Key=f"in/{file}", Body=b"\xff" * size)
                committed_bytes += size
                continue
            with open(file, "r+b") as f:
                f.seek(start)
                f.write(b"\xff" * (end - start))
            committed_bytes += end - start
    if kind == "images":  # sorts first: a listing made again would shift every chunk
        client.put_object(Bucket="photos", Key="in/aaa_new.jpg", Body=JPEG)

    cfg = config.load(None, [f"input.shards={json.dumps([source])}", f"output.path={out}", f"stages={json.dumps(stages)}",
                             "input.batch_images=2", *chunked])
    summary = run_job(cfg, [config.build_stage(s) for s in cfg.stages])

    rows = output_rows(out)
    assert sorted(r["index"] for r in rows) == list(range(6)) and not summary["pending"]
    assert all(r["status"] == "ok" and r["caption"] == "slow;" for r in rows), [r["error"] for r in rows]
    assert len({r["image_key"] for r in rows}) == 6 and "aaa_new" not in {r["image_key"] for r in rows}
    assert {m["unit"]: m for m in store.markers() if m["unit"] in before} == before
    assert summary["committed_now"] == 3 - len(before)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "in") for f in fs)
    footers = 64 << 10 if kind == "parquet" else 0  # each chunk's reader opens the file's footer: its last 64 KiB
    assert 0 < summary["input_bytes_read"] <= size - committed_bytes + footers * summary["committed_now"]

    # exported to GSEval, the images found again: from the folder the job read (its files put back), else from an
    # intact copy of the tars or Parquet files (--shards), as their committed bytes are garbage now
    copy = samples.make_sample_inputs(str(tmp_path / "copy"), kind, images=6, per_file=6)
    if kind == "images":
        for name in listing:
            client.upload_file(os.path.join(copy, name), "photos", f"in/{name}")
    dest, folder = tmp_path / "gseval.jsonl", tmp_path / "images"
    where = ["--s3-endpoint", s3_server] if kind == "images" else ["--shards", copy]
    assert cli.main(["export", str(out), str(dest), "--format", "gseval", "--images", str(folder), *where]) == 0
    lines = [json.loads(line) for line in dest.read_text().splitlines()]
    assert sorted((line["shard"], line["index"]) for line in lines) == sorted((r["shard"], r["index"]) for r in rows)
    for line in lines:
        with open(line["image_path"], "rb") as f:
            assert images.load_rgb(f.read()).shape[:2] == rle.decode(line["segmentation"]).shape
        assert line["image_path"] == f"{folder}/{line['shard']}/{rows_by(rows, line)['image_key']}.jpg"


def rows_by(rows, line):
    return next(r for r in rows if (r["shard"], r["index"]) == (line["shard"], line["index"]))


def _flip(path, start, end):
    """Every byte of ``path`` in [start, end) inverted in place (the file's size unchanged)."""
    with open(path, "r+b") as f:
        f.seek(start)
        data = f.read(end - start)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def corrupt_row_group(path, group, column="image.bytes"):
    """The data page of ``column`` in row group ``group`` overwritten, found from the (intact) footer."""
    meta = pq.ParquetFile(path).metadata.row_group(group)
    chunk = next(meta.column(c) for c in range(meta.num_columns) if meta.column(c).path_in_schema == column)
    _flip(path, chunk.data_page_offset, (chunk.dictionary_page_offset or chunk.data_page_offset)
          + chunk.total_compressed_size)


def corrupt_footer(path):
    """The footer's metadata overwritten, its length and the PAR1 magic intact: pyarrow finds a footer it cannot
    decode (an OSError, as a store's fault is)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(size - 8)
        length = int.from_bytes(f.read(4), "little")
    _flip(path, size - 8 - length + 8, size - 8 - length + 40)


def test_a_corrupt_row_group_or_footer_is_read_as_error_rows_without_retries(tmp_path):
    source = samples.make_sample_inputs(str(tmp_path / "hf"), "parquet", images=6, per_file=6)
    path = os.path.join(source, "train-00000.parquet")
    corrupt_row_group(path, 1)
    with pytest.raises(OSError):  # what pyarrow raises for it, as for a store's fault
        pq.ParquetFile(path).read_row_group(1)
    started = time.monotonic()
    rows = read_all(path, "parquet", chunk_images=4, id_column="id")
    assert rows and time.monotonic() - started < 5  # no retries, whose backoffs add up to 15 s
    assert [(r["unit"], r["index"], r["status"]) for r in rows] == [
        ("train-00000-00000", i, "error" if i in (2, 3) else "ok") for i in range(4)] + [
        ("train-00000-00001", i, "ok") for i in (4, 5)]
    for row in rows[2:4]:
        assert row["error"].startswith("read: Undecodable: row group 1 of ") and not row["transient_error"]
    assert [r["image_key"] for r in rows if r["status"] == "ok"] == ["photo_0000", "photo_0001", "photo_0004",
                                                                       "photo_0005"]
    ends = list({r["unit"]: r["unit_end"] for r in rows if r["unit_end"]}.values())
    assert [(e["offset"], e["next_offset"], e["size"], e["last"]) for e in ends] == [(0, 2, 4, False), (2, 3, 2, True)]

    corrupt_footer(path)
    with pytest.raises(OSError):
        pq.ParquetFile(path)
    # the input's first file is checked before the job starts: one line that names it
    with pytest.raises(errors.BadInput, match="train-00000.parquet is not a readable Parquet file .*footer cannot be "
                                              "decoded"):
        read_all(path, "parquet")
    # a later file of the input: its error row, a unit of its own that is done
    opts = ReadOptions(source=inputs.Source("parquet"), batch_images=2)
    started = time.monotonic()
    pieces = inputs.split(Segment(path, 4), opts)
    rows = [row for piece in pieces for batch in inputs.read_segment(piece, opts) for row in batch]
    assert rows and time.monotonic() - started < 5
    assert [(r["unit"], r["index"], r["status"], r["transient_error"]) for r in rows] == [
        ("train-00000-00000", 0, "error", None)]
    assert "is unreadable (Undecodable: " in rows[0]["error"] and rows[0]["unit_end"]["last"]


def test_a_cut_off_s3_read_of_a_parquet_file_is_retried_and_one_that_persists_leaves_its_chunk_pending(
        s3_server, tmp_path, monkeypatch):
    """A cut-off read raises OSError in pyarrow, as a corrupt page does: this one is the store's fault, transient."""
    from sculpt.io import tables
    from tests.helpers import FaultProxy

    source = samples.make_sample_inputs(str(tmp_path / "hf"), "parquet", images=6, per_file=6)
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="tables")
    client.upload_file(os.path.join(source, "train-00000.parquet"), "tables", "hf/train-00000.parquet")
    opened = tables.ParquetRows.open
    # (reads cut, of the row groups only or from the footer on, attempts)
    for cuts, footer_too, attempts in [(1, False, 3), (99, False, 2), (99, True, 2)]:
        proxy = FaultProxy(s3_server, match="/tables/hf/train-00000.parquet", cuts=cuts if footer_too else 0)

        def open_then_cut(self, proxy=proxy, cuts=cuts):  # the footer read whole, then the row groups' reads cut
            total = opened(self)
            proxy.cuts = cuts
            return total

        monkeypatch.setattr(tables.ParquetRows, "open", opened if footer_too else open_then_cut)
        opts = ReadOptions(source=inputs.Source("parquet", id_column="id"), batch_images=2, read_attempts=attempts,
                           retry_backoff=0.01, s3=storage.S3Options(endpoint=proxy.endpoint, retry_attempts=1))
        rows, taken = [], []  # taken: (unit, rows before): a chunk's place is taken before any of its rows
        try:
            for batch in inputs.read_segment(Segment("s3://tables/hf/train-00000.parquet", 4), opts,
                                             lambda unit: taken.append((unit, len(rows)))):
                rows += batch
        finally:
            proxy.close()
        assert rows and proxy.cut == min(cuts, attempts)
        if cuts < attempts:  # retried: every image read, none an error
            assert [(r["index"], r["image_key"], r["status"], r["transient_error"]) for r in rows] == [
                (i, f"photo_{i:04d}", "ok", None) for i in range(6)]
            assert taken == [("train-00000-00000", 0), ("train-00000-00001", 4)]
        else:  # outlasted its attempts: the chunk's one row says so, and leaves it pending (uncommitted)
            assert [(r["unit"], r["index"], r["status"]) for r in rows] == [("train-00000-00000", -1, "error")]
            assert rows[0]["transient_error"].startswith("read: s3://tables/hf/train-00000.parquet still failed after "
                                                         "2 attempts (OSError: ")
            assert taken == [("train-00000-00000", 0)]


def test_a_job_makes_a_corrupt_row_group_and_a_corrupt_file_error_rows_commits_everything_and_a_rerun_does_nothing(
        local_ray, tmp_path, capsys):
    source = samples.make_sample_inputs(str(tmp_path / "hf"), "parquet", images=12, per_file=6)
    first, second = (os.path.join(source, f"train-0000{n}.parquet") for n in (0, 1))
    corrupt_row_group(first, 1)  # its images 2 and 3, in the first file's first chunk
    corrupt_footer(second)  # not the first file of the input, which is checked before the job starts
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    stages = [hold("a", logs, 1, batch_size=2),
              {"name": "refer", "class": "tests.doubles:ThresholdReferrer", "cpus": 0.5, "batch_size": 2}]
    sets = [f"stages={json.dumps(stages)}", "input.chunk_images=4", "input.id_column=id", "input.batch_images=2"]
    cfg = config.load(None, [f"input.shards={json.dumps([source])}", f"output.path={out}", *sets])
    summary = run_job(cfg, [config.build_stage(s) for s in cfg.stages])

    rows = sorted(output_rows(out), key=lambda r: (r["shard"], r["index"]))
    assert rows
    assert [(r["shard"], r["index"], r["status"]) for r in rows] == [
        ("train-00000", i, "error" if i in (2, 3) else "ok") for i in range(6)] + [("train-00001", 0, "error")]
    for row in rows[2:4]:
        assert row["error"].startswith("read: Undecodable: row group 1 of ") and "train-00000.parquet" in row["error"]
    assert rows[6]["error"].startswith("read: ") and "train-00001.parquet is unreadable (Undecodable: " in (
        rows[6]["error"])
    assert all(r["caption"] == "a;" for r in rows if r["status"] == "ok")
    store = OutputStore(str(out))
    markers = {m["unit"]: m for m in store.markers()}
    assert sorted(markers) == ["train-00000-00000", "train-00000-00001", "train-00001-00000"]
    assert markers["train-00000-00000"]["errors_by_stage"] == {"read": 2}
    assert summary["pending"] == {} and summary["committed_now"] == 3 and summary["errors"] == 3

    # the rerun finds every unit done: it commits nothing, and ends well (exit code 0)
    args = ["run", "--input", source, "--output", str(out), *[a for s in sets for a in ("--set", s)]]
    assert cli.main(args) == 0, capsys.readouterr()
    assert {m["unit"]: m for m in store.markers()} == markers
    assert sorted(output_rows(out), key=lambda r: (r["shard"], r["index"])) == rows
