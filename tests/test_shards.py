import io
import json

import numpy as np
import pytest
from PIL import Image

from sculpt.annotation import images
from sculpt.testing import samples
from sculpt import schema
from sculpt.io import shards
from sculpt.io.shards import ReadOptions, read_shard, shard_name
from tests import helpers


def rows_of(path, **options):
    batches = list(read_shard(str(path), ReadOptions(**options)))
    return batches, [row for batch in batches for row in batch]


def test_sample_shard_streams_in_batches_and_the_last_batch_carries_totals(sample_shards):
    batches, rows = rows_of(sample_shards[0], batch_images=3)
    assert [len(b) for b in batches] == [3, 1]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert all(r["status"] == schema.OK and r["image_bytes"] for r in rows)
    assert all(r["unit_end"] is None for r in batches[0]) and batches[-1][0]["unit_end"]["size"] == 4
    assert 0 < batches[-1][0]["unit_end"]["bytes_read"] <= __import__("os").path.getsize(sample_shards[0])
    assert rows[0]["shard"] == "sa_000000" and rows[0]["image_key"] == "sa_1" and rows[0]["image_id"] == 1
    assert (rows[0]["width"], rows[0]["height"]) == (512, 512)
    assert rows[0]["source_annotations"] is None  # SA-1B's masks are not carried unless asked


def test_keep_source_annotations_carries_sa1b_masks(sample_shards):
    _, rows = rows_of(sample_shards[0], keep_source_annotations=True)
    annotations = json.loads(rows[0]["source_annotations"])
    assert len(annotations) == 2 and set(annotations[0]["segmentation"]) == {"size", "counts"}


def test_shard_name_strips_tar_suffixes():
    assert shard_name("s3://b/x/sa_000123.tar") == "sa_000123"
    assert shard_name("/d/sa_000001.tar.gz") == "sa_000001"


def test_bad_members_become_error_rows_and_reading_goes_on(tmp_path):
    ok = helpers.encoded(helpers.photo())
    members = (
        helpers.pair(1, ok, prefix="")  # no ./ prefix
        + helpers.pair(2, b"this is not a jpeg")
        + helpers.pair(3, ok[: len(ok) // 2])  # truncated JPEG
        + [("./sa_4.jpg", ok)]  # image without json
        + [("./sa_5.json", samples.sa1b_json(5, np.zeros((2, 2, 3), np.uint8)))]  # json without image
        + [("./sa_6.jpg", ok), ("./sa_6.json", b"{not json")]
        + helpers.pair(7, helpers.bomb_jpeg())
        + helpers.pair(8, ok)
        + [("./README.txt", b"ignored")]
    )
    path = tmp_path / "sa_000009.tar"
    samples.write_tar(str(path), members)
    _, rows = rows_of(path, batch_images=2)
    by_key = {r["image_key"]: r for r in rows}
    assert sorted(by_key) == [f"sa_{i}" for i in range(1, 9)]  # every image once, nothing dropped
    assert [r["index"] for r in rows] == list(range(8)) and rows[-1]["unit_end"]["size"] == 8
    assert by_key["sa_1"]["status"] == by_key["sa_8"]["status"] == schema.OK
    expected = {
        "sa_2": "not a readable image",
        "sa_3": "corrupt image data",
        "sa_4": "has no .json",
        "sa_5": "has no image",
        "sa_6": "not SA-1B image metadata",
        "sa_7": "image too large",
    }
    for key, message in expected.items():
        row = by_key[key]
        assert row["status"] == schema.ERROR and message in row["error"], (key, row["error"])
        assert row["error"].startswith("read: ") and row["image_bytes"] is None


def test_image_over_the_configured_pixel_limit_is_refused(tmp_path):
    path = tmp_path / "sa_000004.tar"
    samples.write_tar(str(path), helpers.pair(1, helpers.encoded(helpers.photo())))  # 451 x 300
    _, rows = rows_of(path, max_image_pixels=100_000)
    assert "image too large: 451x300 = 135,300 pixels is over input.max_image_pixels=100,000" in rows[0]["error"]


def test_truncated_tar_keeps_the_images_before_the_cut(tmp_path):
    whole = tmp_path / "whole.tar"
    ok = helpers.encoded(helpers.photo())
    samples.write_tar(str(whole), helpers.pair(1, ok) + helpers.pair(2, ok) + helpers.pair(3, ok))
    data = whole.read_bytes()
    cut = tmp_path / "sa_000001.tar"
    cut.write_bytes(data[: data.index(b"sa_3.jpg") + 2000])  # inside sa_3.jpg's data
    _, rows = rows_of(cut)
    assert [r["status"] for r in rows] == [schema.OK, schema.OK, schema.ERROR]
    assert rows[2]["image_key"] == "sa_3" and "cut off" in rows[2]["error"]
    assert rows[-1]["unit_end"]["size"] == 3


@pytest.mark.parametrize("content", [b"", b"garbage" * 100])
def test_unreadable_or_empty_shard_is_one_error_row(tmp_path, content):
    path = tmp_path / "sa_000002.tar"
    path.write_bytes(content)
    _, rows = rows_of(path)
    assert len(rows) == 1 and rows[0]["status"] == schema.ERROR and rows[0]["image_key"] == ""
    assert rows[0]["unit_end"]["size"] == 1


def test_missing_shard_is_one_error_row(tmp_path):
    _, rows = rows_of(tmp_path / "nope.tar")
    assert len(rows) == 1 and "unreadable" in rows[0]["error"]


def test_image_modes_decode_to_upright_rgb(tmp_path):
    rgb = helpers.photo("chelsea")  # 300 x 451
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    variants = {
        1: helpers.encoded(gray),
        2: helpers.encoded(Image.fromarray(rgb).convert("CMYK")),
        3: helpers.encoded(rgba, fmt="PNG"),
        4: helpers.exif_rotated_jpeg(rgb, orientation=6),
    }
    path = tmp_path / "sa_000003.tar"
    samples.write_tar(str(path), [m for i, data in variants.items() for m in helpers.pair(i, data)])
    _, rows = rows_of(path)
    assert all(r["status"] == schema.OK for r in rows), [r["error"] for r in rows]
    assert [(r["width"], r["height"]) for r in rows] == [(451, 300)] * 3 + [(300, 451)]
    for row in rows:
        array = images.load_rgb(row["image_bytes"])
        assert array.shape == (row["height"], row["width"], 3) and array.dtype == np.uint8
    # the rotated image's upright pixels are the original turned 90° clockwise (EXIF orientation 6)
    upright = images.load_rgb(rows[3]["image_bytes"]).astype(int)
    assert np.abs(upright - np.rot90(rgb, k=-1)).mean() < 8
    # RGBA is composited on white, not stripped of alpha
    composited = images.load_rgb(rows[2]["image_bytes"]).astype(int)
    assert np.abs(composited - (rgb.astype(int) * 128 + 255 * 127) // 255).max() <= 2


class FlakyOpen:
    """Stands in for shards._open_at: the first ``faults`` streams raise ConnectionResetError after ``after`` bytes."""

    def __init__(self, faults, after):
        self.faults, self.after, self.offsets = faults, after, []
        self.real = shards._open_at

    def __call__(self, uri, offset, s3, end=None):
        self.offsets.append(offset)
        stream, size = self.real(uri, offset, s3, end)
        if len(self.offsets) > self.faults:
            return stream, size
        budget = [self.after]

        class Resetting:
            def read(_, n=-1):
                if budget[0] <= 0:
                    raise ConnectionResetError(104, "Connection reset by peer")
                data = stream.read(min(n, budget[0]) if n and n > 0 else budget[0])
                budget[0] -= len(data)
                return data

        return Resetting(), size


def six_image_shard(tmp_path, name="sa_000007.tar"):
    ok = helpers.encoded(helpers.photo())
    path = tmp_path / name
    samples.write_tar(str(path), [m for i in range(1, 7) for m in helpers.pair(i, ok)])
    return path


def test_a_reset_mid_tar_reopens_where_it_broke_and_loses_nothing(tmp_path, monkeypatch):
    path = six_image_shard(tmp_path)
    _, clean = rows_of(path)
    flaky = FlakyOpen(faults=2, after=path.stat().st_size // 3)
    monkeypatch.setattr(shards, "_open_at", flaky)
    _, rows = rows_of(path, read_attempts=3, retry_backoff=0)
    assert len(flaky.offsets) == 3 and 0 < flaky.offsets[1] < flaky.offsets[2] < path.stat().st_size  # ranged reopens
    assert [r["image_key"] for r in rows] == [r["image_key"] for r in clean] == [f"sa_{i}" for i in range(1, 7)]
    assert [r["status"] for r in rows] == [schema.OK] * 6 and not any(r["transient_error"] for r in rows)
    assert [r["image_bytes"] for r in rows] == [r["image_bytes"] for r in clean]
    assert rows[-1]["unit_end"]["size"] == 6


def test_a_compressed_tar_starts_over_and_skips_what_it_read(tmp_path, monkeypatch):
    import gzip

    path = six_image_shard(tmp_path)
    gz = tmp_path / "sa_000008.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    flaky = FlakyOpen(faults=1, after=gz.stat().st_size // 2)
    monkeypatch.setattr(shards, "_open_at", flaky)
    _, rows = rows_of(gz, read_attempts=2, retry_backoff=0)
    assert flaky.offsets == [0, 0]
    assert [r["image_key"] for r in rows] == [f"sa_{i}" for i in range(1, 7)] and rows[-1]["unit_end"]["size"] == 6


def test_a_shard_that_keeps_failing_is_left_pending_not_cut_short(tmp_path, monkeypatch):
    path = six_image_shard(tmp_path)
    monkeypatch.setattr(shards, "_open_at", FlakyOpen(faults=99, after=path.stat().st_size // 6))
    _, rows = rows_of(path, read_attempts=3, retry_backoff=0)
    failed = [r for r in rows if r["transient_error"]]
    assert len(failed) == 1 and "still failed after 3 attempts" in failed[0]["transient_error"]
    assert "ConnectionResetError" in failed[0]["transient_error"]
    assert all(r["unit_end"] is None for r in rows)  # no row claims the shard is complete


def reopen_raising(monkeypatch, path, fault):
    """The first stream of ``path`` resets a third of the way in, and the open after it raises ``fault``; the
    opens' offsets, and the keyword arguments the reader gave the shared retry helper (errors.retrying_stream)."""
    flaky, opens, helper = FlakyOpen(faults=1, after=path.stat().st_size // 3), [], []

    def open_at(uri, offset, s3, end=None):
        opens.append(offset)
        if len(opens) == 2:
            raise fault
        return flaky(uri, offset, s3, end)

    shared = shards.errors.retrying_stream
    monkeypatch.setattr(shards, "_open_at", open_at)
    monkeypatch.setattr(shards.errors, "retrying_stream",
                        lambda *args, **kwargs: helper.append(kwargs) or shared(*args, **kwargs))
    return opens, helper


def test_a_transient_fault_on_a_reopen_is_retried_by_the_shared_helper(tmp_path, monkeypatch):
    path = six_image_shard(tmp_path)
    opens, helper = reopen_raising(monkeypatch, path, ConnectionRefusedError(111, "Connection refused"))
    _, rows = rows_of(path, read_attempts=3, retry_backoff=0)
    assert len(opens) == 3 and 0 < opens[1] == opens[2]  # the failed reopen is tried again from the same place
    assert helper == [{"store": str(path), "reading": True}]
    assert [r["image_key"] for r in rows] == [f"sa_{i}" for i in range(1, 7)]
    assert [r["status"] for r in rows] == [schema.OK] * 6 and not any(r["transient_error"] for r in rows)


def test_a_permanent_fault_on_a_reopen_is_not_retried(tmp_path, monkeypatch):
    path = six_image_shard(tmp_path)
    opens, helper = reopen_raising(monkeypatch, path, PermissionError(13, "Permission denied"))
    _, rows = rows_of(path, read_attempts=5, retry_backoff=0)
    assert len(opens) == 2 and len(helper) == 1  # no third open, though four more were allowed
    # readable before: a fault, not data; the chunk stays pending
    assert len(rows) == 1 and "became unreadable" in rows[0]["transient_error"]
    assert "PermissionError" in rows[0]["transient_error"] and rows[0]["unit_end"] is None


def test_a_shard_gone_when_a_resume_reads_it_leaves_the_chunk_pending_not_the_shard_done(tmp_path):
    path = six_image_shard(tmp_path)
    first = chunk_rows(shards.Segment(str(path), chunk_images=2))[1]["unit_end"]
    path.unlink()  # a mount gone, a shard being replaced
    start = shards.Position(1, first["next_offset"], first["next_members"], first["next_index"])
    rows = [row for batch in shards.read_segment(shards.Segment(str(path), 2, start)) for row in batch]
    assert len(rows) == 1 and "became unreadable" in rows[0]["transient_error"] and rows[0]["unit_end"] is None
    (fresh,) = [row for batch in shards.read_segment(shards.Segment(str(path), 2)) for row in batch]
    assert fresh["transient_error"] is None and fresh["unit_end"]["last"]  # from the start: bad input, an error row


def test_a_shard_gone_when_a_redo_or_a_split_chunk_reads_it_leaves_the_chunk_pending(tmp_path):
    """Chunk 0 read again (--redo-errors) or as a piece that split() found: the shard was readable before."""
    path = six_image_shard(tmp_path)
    pieces = shards.split(shards.Segment(str(path), chunk_images=2))
    assert len(pieces) == 3 and pieces[0].stop_offset is not None
    path.unlink()
    for segment in (pieces[0], shards.Segment(str(path), chunk_images=2, only={0: [1]})):
        rows = [row for batch in shards.read_segment(segment) for row in batch]
        assert len(rows) == 1 and "became unreadable" in rows[0]["transient_error"] and rows[0]["unit_end"] is None


def test_error_rows_keep_the_image_id_their_member_name_gives(tmp_path):
    path = tmp_path / "sa_000011.tar"
    samples.write_tar(str(path), [("./sa_77.jpg", b""), ("./sa_77.json", b"{not json"), ("./sa_78.jpg", b"")]
                      + helpers.pair(79, b""))
    _, rows = rows_of(path)
    by_key = {r["image_key"]: r for r in rows}
    assert {k: r["image_id"] for k, r in by_key.items()} == {"sa_77": 77, "sa_78": 78, "sa_79": 79}
    assert all(r["status"] == schema.ERROR for r in rows)
    assert by_key["sa_79"]["error"] == "read: not a readable image: the image file is empty (0 bytes)"
    assert shards.image_id_of("photos/IMG_1.jpg") is None


def chunk_rows(segment, **options):
    rows = [row for batch in shards.read_segment(segment, ReadOptions(**options)) for row in batch]
    assert rows, "the segment yielded no rows"
    return rows


def test_a_shard_is_read_in_chunks_and_each_chunk_says_where_the_next_begins(tmp_path):
    path = six_image_shard(tmp_path)
    rows = chunk_rows(shards.Segment(str(path), chunk_images=4), batch_images=2)
    assert [(r["unit"], r["index"]) for r in rows] == [("sa_000007-00000", i) for i in range(4)] + [
        ("sa_000007-00001", 4), ("sa_000007-00001", 5)]
    ends = [r["unit_end"] for r in rows if r["unit_end"]]
    first, second = ends[0], ends[-1]  # every row of a chunk's last batch carries its end
    assert first["size"] == 4 and not first["last"] and first["next_index"] == 4 and first["offset"] == 0
    assert second["size"] == 2 and second["last"] and second["offset"] == first["next_offset"]
    # The second chunk alone, from where the first chunk's end says: the same rows, no byte before it read.
    data = path.read_bytes()
    path.write_bytes(b"\0garbage" * (first["next_offset"] // 8) + data[first["next_offset"]:])
    start = shards.Position(1, first["next_offset"], first["next_members"], first["next_index"])
    again = chunk_rows(shards.Segment(str(path), chunk_images=4, start=start))
    assert [(r["unit"], r["index"], r["image_bytes"]) for r in again] == [
        (r["unit"], r["index"], r["image_bytes"]) for r in rows[4:]]
    assert again[-1]["unit_end"]["bytes_read"] <= len(data) - first["next_offset"]


def test_split_finds_every_chunk_start_without_reading_images_and_chunks_read_alone_match(tmp_path):
    path = six_image_shard(tmp_path)
    whole = chunk_rows(shards.Segment(str(path), chunk_images=2))
    pieces = shards.split(shards.Segment(str(path), chunk_images=2))
    assert [p.start.chunk for p in pieces] == [0, 1, 2] and [p.stop for p in pieces] == [1, 2, None]
    ends = list({r["unit"]: r["unit_end"] for r in whole if r["unit_end"]}.values())
    assert [p.start.offset for p in pieces[1:]] == [e["next_offset"] for e in ends[:-1]]
    data = path.read_bytes()
    for piece in pieces:  # a chunk read alone touches only its own bytes: garbage all around it changes nothing
        lo, hi = piece.start.offset, piece.stop_offset or len(data)
        path.write_bytes(b"\xff" * lo + data[lo:hi] + b"\xff" * (len(data) - hi))
        alone = chunk_rows(piece)
        assert [(r["index"], r["image_bytes"]) for r in alone] == [
            (r["index"], r["image_bytes"]) for r in whole if r["unit"] == shards.unit_name("sa_000007", piece.start.chunk)]
        assert alone[-1]["unit_end"]["last"] == (piece.stop is None)
    path.write_bytes(data)
    compressed = tmp_path / "sa_000008.tar.gz"
    compressed.write_bytes(__import__("gzip").compress(data))
    assert shards.split(shards.Segment(str(compressed), chunk_images=2)) == [shards.Segment(str(compressed), chunk_images=2)]


def test_splitting_a_run_of_chunks_reads_no_byte_of_the_committed_chunk_after_it(tmp_path, monkeypatch):
    path = six_image_shard(tmp_path)
    pieces = shards.split(shards.Segment(str(path), chunk_images=2))
    stop_offset, reached = pieces[2].start.offset, []

    class Counted(io.FileIO):  # what the OS is asked for: the furthest byte read
        def readinto(self, buffer):
            n = super().readinto(buffer)
            reached.append(self.tell())
            return n

        def read(self, size=-1):
            data = super().read(size)
            reached.append(self.tell())
            return data

    monkeypatch.setattr(shards, "open", lambda file, mode, buffering=-1: io.BufferedReader(Counted(file)) if buffering
                        else Counted(file), raising=False)
    assert shards.split(shards.Segment(str(path), chunk_images=2, stop=2, stop_offset=stop_offset)) == pieces[:2]
    assert reached and max(reached) <= stop_offset


def test_a_chunk_does_not_cut_an_image_from_its_metadata(tmp_path):
    ok = helpers.encoded(helpers.photo())
    path = tmp_path / "sa_000009.tar"
    json_first = [m for i in range(1, 5) for m in reversed(helpers.pair(i, ok))]  # sa_i.json before sa_i.jpg
    samples.write_tar(str(path), json_first)
    rows = chunk_rows(shards.Segment(str(path), chunk_images=2))
    assert [r["status"] for r in rows] == [schema.OK] * 4
    assert [r["unit"][-1] for r in rows] == ["0", "0", "1", "1"]
    assert [p.start.index for p in shards.split(shards.Segment(str(path), chunk_images=2))] == [0, 2]
