"""Input and output on S3, through moto's S3 server on 127.0.0.1 (no other network is touched)."""

import json

import boto3
import pyarrow.dataset as pads
import pytest

from sculpt import config
from sculpt.engine import planning
from sculpt.engine import pipeline
from sculpt.engine.job import annotate as run_job, take_output
from sculpt.io import storage
from sculpt.cli import status
from sculpt.outputs.store import OutputStore
from sculpt.io.shards import shard_name


@pytest.fixture
def bucket(s3_server, sample_shards, request):
    client = boto3.client("s3", endpoint_url=s3_server)
    name = request.node.name.replace("_", "-")[:50].lower()
    client.create_bucket(Bucket=name)
    for path in sample_shards:
        client.upload_file(path, name, f"sa1b/{path.rsplit('/', 1)[1]}")
    return client, name


def s3_job(endpoint, bucket, tmp_path, *extra):
    stage = {"name": "hold", "class": "tests.doubles:HoldGpu", "gpus": 0.5, "params": {"log_dir": str(tmp_path)}}
    overrides = [f"input.shards=[s3://{bucket}/sa1b/]", f"output.path=s3://{bucket}/out", f"s3.endpoint={endpoint}",
                 f"stages={json.dumps([stage])}", "input.batch_images=2", *extra]
    cfg = config.load(None, overrides)
    return cfg, [config.build_stage(s) for s in cfg.stages]


def test_listing_globs_and_prefixes(s3_server, bucket):
    _, name = bucket
    s3 = storage.S3Options(endpoint=s3_server)
    assert [shard_name(u) for u in storage.list_files(f"s3://{name}/sa1b/", s3)] == ["sa_000000", "sa_000001", "sa_000002"]
    assert storage.list_files(f"s3://{name}/sa1b/sa_00000[12].tar", s3) == [f"s3://{name}/sa1b/sa_000001.tar", f"s3://{name}/sa1b/sa_000002.tar"]
    with pytest.raises(FileNotFoundError):
        storage.list_files(f"s3://{name}/nothing/", s3)


def test_an_s3_glob_matches_what_the_same_glob_matches_on_a_local_disk(s3_server, bucket, tmp_path):
    client, name = bucket
    keys = ["g/sa1b/sa_000010.tar", "g/sa1b/val/sa_000011.tar", "g/sa1b/val/deep/sa_000012.tar", "g/sa1b-old/sa_000013.tar"]
    for key in keys:
        client.put_object(Bucket=name, Key=key, Body=b"x")
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
    s3 = storage.S3Options(endpoint=s3_server)
    for pattern, shards in [("g/sa1b/*.tar", ["sa_000010"]), ("g/sa1b*/sa_*.tar", ["sa_000013", "sa_000010"]),
                            ("g/sa1b/*/sa_*.tar", ["sa_000011"]),
                            ("g/sa1b/**/*.tar", ["sa_000010", "sa_000012", "sa_000011"])]:
        listed = (storage.list_files(f"s3://{name}/{pattern}", s3), storage.list_files(str(tmp_path / pattern)))
        assert [[shard_name(u) for u in found] for found in listed] == [shards, shards], pattern


def test_a_directory_lists_compressed_shards_too(s3_server, bucket, tmp_path):
    client, name = bucket
    for key in ("packed/sa_000007.tar.gz", "packed/sa_000008.tgz", "packed/sa_000009.tar", "packed/notes.txt"):
        client.put_object(Bucket=name, Key=key, Body=b"x")
        (tmp_path / key).parent.mkdir(exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
    s3 = storage.S3Options(endpoint=s3_server)
    for listed in (storage.list_files(f"s3://{name}/packed/", s3), storage.list_files(str(tmp_path / "packed"))):
        assert [shard_name(u) for u in listed] == ["sa_000007", "sa_000008", "sa_000009"]


def test_s3_in_s3_out_and_a_resume_mid_shard_reads_no_byte_of_committed_chunks(local_ray, s3_server, bucket, tmp_path):
    client, name = bucket
    cfg, stages = s3_job(s3_server, name, tmp_path, "input.chunk_images=2")  # each 4-image shard: two chunks
    first = run_job(cfg, stages)
    assert first["committed_now"] == 6 and first["images"] == 12
    total_input = sum(o["Size"] for o in client.list_objects_v2(Bucket=name, Prefix="sa1b/")["Contents"])
    assert 0 < first["input_bytes_read"] <= total_input

    keys = {o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix="out/")["Contents"]}
    assert {"out/sa_000000-00000.parquet", "out/.sculpt/markers/sa_000000-00001.json", "out/.sculpt/job.json"} <= keys
    assert not [k for k in keys if "_tmp" in k]  # part files and temporaries are gone
    store = OutputStore(f"s3://{name}/out", cfg.s3)
    before = {m["unit"]: m for m in store.markers()}

    # Lost markers: shard 1 redoes its second chunk, shard 2 its first (a read that must stop where chunk 1
    # begins). Every chunk that stays committed becomes garbage in place, in S3: reading a byte of it would show.
    redo = {"sa_000001-00001", "sa_000002-00000"}
    for shard in ("sa_000000", "sa_000001", "sa_000002"):
        body = bytearray(client.get_object(Bucket=name, Key=f"sa1b/{shard}.tar")["Body"].read())
        for unit, marker in before.items():
            if unit.startswith(shard) and unit not in redo:
                start, end = marker["end"]["offset"], marker["end"]["next_offset"]
                body[start:end] = b"\xff" * (end - start)
        client.put_object(Bucket=name, Key=f"sa1b/{shard}.tar", Body=bytes(body))
    for unit in redo:
        client.delete_object(Bucket=name, Key=f"out/.sculpt/markers/{unit}.json")
    second = run_job(cfg, stages)

    assert second["committed_now"] == 2 and second["errors"] == 0
    sizes = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=name, Prefix="sa1b/")["Contents"]}
    redo_bytes = sum((sizes[f"sa1b/{u[:-6]}.tar"] if before[u]["end"]["last"] else before[u]["end"]["next_offset"])
                     - before[u]["end"]["offset"] for u in redo)  # a shard's last chunk: to the tar's end
    assert 0 < second["input_bytes_read"] <= redo_bytes
    fs, path = storage.filesystem(f"s3://{name}/out", cfg.s3)
    rows = pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()
    assert sorted((r["shard"], r["index"]) for r in rows) == [(f"sa_00000{s}", i) for s in range(3) for i in range(4)]
    after = {m["unit"]: m for m in store.markers()}
    assert {u: after[u] for u in before if u not in redo} == {u: m for u, m in before.items() if u not in redo}
    assert {u: after[u]["end"] for u in redo} == {u: before[u]["end"] | {"bytes_read": after[u]["end"]["bytes_read"]}
                                                 for u in redo}
    assert "shards   3/3 done (6 chunks committed)" in status(f"s3://{name}/out", cfg.s3)


def all_output_bytes(client, name):
    return b"".join(client.get_object(Bucket=name, Key=o["Key"])["Body"].read()
                    for o in client.list_objects_v2(Bucket=name, Prefix="out/").get("Contents", []))


def test_cut_off_s3_reads_are_resumed_and_a_shard_that_keeps_failing_stays_pending(local_ray, s3_server, bucket, tmp_path,
                                                                                    capfd):
    import os

    from tests.helpers import FaultProxy

    client, name = bucket
    # Two cut-off responses on one shard, with the S3 client's own retries off: sculpt's reader reopens the
    # stream where it broke.
    proxy = FaultProxy(s3_server, match=f"/{name}/sa1b/sa_000001.tar", cuts=2)
    try:
        cfg, stages = s3_job(proxy.endpoint, name, tmp_path)
        cfg.s3 = storage.S3Options(endpoint=proxy.endpoint, retry_attempts=1)
        cfg.faults.backoff_seconds = 0.01
        first = run_job(cfg, stages)
    finally:
        proxy.close()
    assert proxy.cut == 2
    assert first["committed_now"] == 3 and first["pending"] == {} and first["errors"] == 0
    fs, path = storage.filesystem(f"s3://{name}/out", storage.S3Options(endpoint=s3_server))
    rows = pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()
    assert sorted((r["shard"], r["index"]) for r in rows) == [(f"sa_00000{s}", i) for s in range(3) for i in range(4)]

    # A shard whose every read is cut off: after faults.read_attempts it is left pending, never committed short.
    client.delete_object(Bucket=name, Key="out/.sculpt/markers/sa_000002-00000.json")
    proxy = FaultProxy(s3_server, match=f"/{name}/sa1b/sa_000002.tar", cuts=99)
    try:
        cfg.s3 = storage.S3Options(endpoint=proxy.endpoint, retry_attempts=1)
        cfg.faults.read_attempts = 2
        second = run_job(cfg, stages)
    finally:
        proxy.close()
    assert list(second["pending"]) == ["sa_000002-00000"]
    assert "still failed after 2 attempts" in second["pending"]["sa_000002-00000"]
    assert "out/.sculpt/markers/sa_000002-00000.json" not in {o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix="out/")["Contents"]}

    # Credentials never reach an output file (job file, markers, statistics, Parquet) or the job's output.
    written = all_output_bytes(client, name) + "".join(capfd.readouterr()).encode()
    assert written and b"sa_000001" in written
    for secret in (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]):
        assert secret.encode() not in written


def test_one_job_at_a_time_on_an_s3_output_each_unit_one_upload_and_no_leftovers(local_ray, s3_server, bucket, tmp_path):
    from sculpt.io.lease import LEASE_FILE, OutputBusy

    client, name = bucket
    left = client.create_multipart_upload(Bucket=name, Key="out/sa_000001-00000.parquet")  # a killed job's upload
    client.put_object(Bucket=name, Key="out/_markers/_tmp/sa_000001-00000.json.0badc0ffee00", Body=b"{")  # and temp file
    cfg, stages = s3_job(s3_server, name, tmp_path)

    first = planning.plan(cfg, stages)
    with take_output(cfg, stages, first) as (first, lease):  # holds the lease until its run ends
        assert client.head_object(Bucket=name, Key=f"out/{LEASE_FILE}")
        second = planning.plan(cfg, stages)  # planning reads only
        with pytest.raises(OutputBusy, match="another job is writing this output"):
            with take_output(cfg, stages, second):  # a second job on the same output is refused before it touches anything
                pass
        assert client.list_multipart_uploads(Bucket=name, Prefix="out/").get("Uploads", []) == []  # the first cleaned up
        summary = pipeline.run(cfg, stages, first, lease)

    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix="out/")["Contents"])
    assert summary["committed_now"] == 3 and f"out/{LEASE_FILE}" not in keys  # given back
    assert not [k for k in keys if "_tmp" in k]  # units went up in one upload each: no temporary objects
    assert left["UploadId"] and [k for k in keys if k.endswith(".parquet")] == [f"out/sa_00000{i}-00000.parquet" for i in range(3)]
    rows = pads.dataset(f"{name}/out", format="parquet", filesystem=storage.filesystem(f"s3://{name}", storage.S3Options(endpoint=s3_server))[0]).to_table()
    assert rows.num_rows == 12 and len(set(zip(rows["shard"].to_pylist(), rows["index"].to_pylist()))) == 12
    assert run_job(cfg, stages)["committed_now"] == 0  # the lease is free again: a rerun plans and finds all done


def test_an_empty_lease_object_on_s3_is_nobodys(s3_server, bucket):
    from sculpt.io.lease import LEASE_FILE, Lease

    client, name = bucket
    client.put_object(Bucket=name, Key=f"out/{LEASE_FILE}", Body=b"")  # left by a tool, or a write cut short
    lease = Lease(f"s3://{name}/out", storage.S3Options(endpoint=s3_server)).acquire()
    body = json.loads(client.get_object(Bucket=name, Key=f"out/{LEASE_FILE}")["Body"].read())
    assert body["owner"] == lease.record["owner"]
    lease.release()
    left = [o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix="out/").get("Contents", [])]
    assert left in ([], ["out/"]), left  # at most the folder marker pyarrow leaves


def test_a_job_whose_s3_lease_was_deleted_learns_it_at_its_next_renewal(s3_server, bucket):
    """If-Match on a key that is gone answers 404: the lease is no longer ours (a user deleted it, as the busy
    message offers, or a job that took it over has ended), not an unreachable store to wait for."""
    from sculpt.io.lease import LEASE_FILE, Lease, OutputBusy

    client, name = bucket
    lease = Lease(f"s3://{name}/out", storage.S3Options(endpoint=s3_server), ttl_seconds=1000).acquire()
    client.delete_object(Bucket=name, Key=f"out/{LEASE_FILE}")
    assert not lease.renew() and lease.lost
    with pytest.raises(OutputBusy, match="this job lost its lease"):
        lease.check()
    lease.release()
