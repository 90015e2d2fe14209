"""Store faults before and after the units: a small object's read (the lease, the job file, a marker) is read
again when its body is cut; a store fault taking, preparing or tidying the output ends the job with one line; the
end-of-run statistics never fail a committed run. On moto's S3 server: one output, committed once on the local Ray,
then rerun through a faulty proxy (a rerun of a finished output reads nothing of its input: it takes the output,
reads every marker for the statistics and gives the output back, in seconds)."""

import json

import boto3
import pytest

from sculpt import cli, config
from sculpt.engine import planning
from sculpt.engine.job import take_output
from sculpt.io import storage
from sculpt.io.lease import LEASE_FILE, Lease
from sculpt.outputs import report
from sculpt.outputs.store import JOB_FILE, STATS_FILE, OutputStore
from tests.helpers import FaultProxy, RefusingProxy

BUCKET = "store-faults"
OUT = f"s3://{BUCKET}/out"
STAGE = {"name": "m", "class": "tests.doubles:ThresholdMasker", "gpus": 0.25, "cpus": 0.5}


def run_argv(shards, endpoint, *extra):
    argv = ["run", "--output", OUT, "--s3-endpoint", endpoint, "--set", f"stages={json.dumps([STAGE])}",
            "--set", "faults.backoff_seconds=0.01", *extra]
    for shard in shards:
        argv += ["--input", shard]
    return argv


@pytest.fixture(scope="module")
def done(s3_server, sample_shards, local_ray):
    """A finished output on S3: (boto3 client, argv that reruns its job through an endpoint)."""
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=BUCKET)
    assert cli.main(run_argv(sample_shards, s3_server)) == 0
    return client, lambda endpoint, *extra: run_argv(sample_shards, endpoint, *extra)


@pytest.fixture(autouse=True)
def quick_reads(monkeypatch):
    monkeypatch.setattr(storage, "READ_BACKOFF", 0.01)


def keys(client, prefix="out/"):
    return {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}


def error_lines(err):
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("sculpt: error:")]


def test_a_lease_read_cut_short_is_read_again_a_cut_404_included(done, s3_server, capsys):
    client, argv = done
    # the lease's read at the start is a 404 whose body is cut (no lease yet), its read at the end (given back) is
    # cut twice; with the S3 client's own retries off
    proxy = FaultProxy(s3_server, match=LEASE_FILE, cuts=3)
    try:
        code = cli.main(argv(proxy.endpoint, "--set", "s3.retry_attempts=1"))
    finally:
        proxy.close()
    assert (code, proxy.cut) == (0, 3), capsys.readouterr().err
    assert f"out/{LEASE_FILE}" not in keys(client)

    # a stale lease (its holder stopped renewing) whose reads are cut: taken over all the same
    client.put_object(Bucket=BUCKET, Key=f"out/{LEASE_FILE}",
                      Body=json.dumps({"owner": "gone", "host": "elsewhere", "pid": 1, "renewed": 0}).encode())
    proxy = FaultProxy(s3_server, match=LEASE_FILE, cuts=2)
    try:
        lease = Lease(OUT, storage.S3Options(endpoint=proxy.endpoint, retry_attempts=1)).acquire()
        assert proxy.cut == 2
        lease.release()
    finally:
        proxy.close()
    assert f"out/{LEASE_FILE}" not in keys(client)


def test_a_job_file_read_cut_short_is_read_again(done, s3_server):
    proxy = FaultProxy(s3_server, match=JOB_FILE, cuts=2)
    try:
        job = OutputStore(OUT, storage.S3Options(endpoint=proxy.endpoint, retry_attempts=1)).job()
    finally:
        proxy.close()
    assert proxy.cut == 2 and job and job["fingerprint"]


@pytest.mark.parametrize("refused, doing", [
    ("", "taking the output's lease"),  # every PUT: the lease's is the first
    (JOB_FILE, "clearing the output and writing the job file"),
])
def test_an_s3_refusing_the_output_before_the_units_ends_the_job_with_one_line(done, s3_server, capsys, refused, doing):
    client, argv = done
    proxy = RefusingProxy(s3_server, match=refused)
    try:
        code = cli.main(argv(proxy.endpoint, "--set", "s3.retry_attempts=2"))
    finally:
        proxy.close()
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"sculpt: error: {doing} on {OUT} failed: S3 is unreachable or refused the request")
    assert "SlowDown" in lines[0] and "check s3.endpoint" in lines[0]
    assert proxy.refused == 2  # the S3 client's tries of one request, no more
    assert f"out/{LEASE_FILE}" not in keys(client)  # given back, or never taken


def test_statistics_that_cannot_be_written_or_read_keep_a_committed_runs_exit_status(done, s3_server, monkeypatch,
                                                                                      capsys):
    client, argv = done
    client.delete_object(Bucket=BUCKET, Key=f"out/{STATS_FILE}")
    proxy = RefusingProxy(s3_server, match=STATS_FILE)
    try:
        code = cli.main(argv(proxy.endpoint, "--set", "s3.retry_attempts=1"))
    finally:
        proxy.close()
    err = capsys.readouterr().err
    assert code == 0 and error_lines(err) == [] and proxy.refused == 1
    warned = [line for line in err.splitlines() if "statistics" in line]
    assert len(warned) == 1 and warned[0].startswith("sculpt: warning: could not write the output's statistics")
    assert f"`sculpt report {OUT}` reads them later" in warned[0]
    assert f"out/{STATS_FILE}" not in keys(client)

    # every marker's read cut a few times while the statistics are read: read again, and the statistics written
    assert rerun_cutting_markers(argv, s3_server, monkeypatch, cuts=6) == (0, 6)
    assert "statistics" not in capsys.readouterr().err
    assert json.loads(client.get_object(Bucket=BUCKET, Key=f"out/{STATS_FILE}")["Body"].read())["images"] == 12

    # ...and cut every time: one line, the exit status kept
    code, cut = rerun_cutting_markers(argv, s3_server, monkeypatch, cuts=10**6)
    out, err = capsys.readouterr()
    warned = [line for line in err.splitlines() if "statistics" in line]
    assert code == 0 and cut == 3 * storage.READ_ATTEMPTS and error_lines(err) == [] and len(warned) == 1, err
    assert warned[0].startswith("sculpt: warning: could not read the output's statistics (OSError: ")
    assert "[sculpt] this run: 0 unit(s) committed" in out and "whole output" not in out


def rerun_cutting_markers(argv, s3_server, monkeypatch, cuts):
    """Rerun the finished job with its markers' reads cut ``cuts`` times from when the statistics are read (planning
    reads markers too); (exit code, cuts served)."""
    proxy = FaultProxy(s3_server, match="/markers/", cuts=0)
    reading = report.job_stats

    def cut_from_now(store):
        proxy.cuts = cuts
        return reading(store)

    monkeypatch.setattr(report, "job_stats", cut_from_now)
    try:
        return cli.main(argv(proxy.endpoint, "--set", "s3.retry_attempts=1")), proxy.cut
    finally:
        proxy.close()


def test_a_tidy_that_fails_still_gives_the_lease_back_and_does_not_hide_the_runs_own_error(done, s3_server, sample_shards,
                                                                                              monkeypatch, capsys):
    import botocore.exceptions

    client, argv = done

    def unreachable(store):
        raise botocore.exceptions.EndpointConnectionError(endpoint_url=s3_server)

    monkeypatch.setattr(OutputStore, "tidy", unreachable)
    code = cli.main(argv(s3_server))
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"sculpt: error: tidying the output on {OUT} failed: S3 is unreachable or refused "
                               "the request (EndpointConnectionError: Could not connect")
    assert f"out/{LEASE_FILE}" not in keys(client)

    # a run that failed ends with its own error; the tidy's fault is a warning beside it
    cfg = config.load(None, [f"output.path={OUT}", f"s3.endpoint={s3_server}", f"stages={json.dumps([STAGE])}",
                             f"input.shards={json.dumps(sample_shards)}"])
    todo = planning.plan(cfg, [config.build_stage(s) for s in cfg.stages])
    with pytest.raises(ValueError, match="the run's own"):
        with take_output(cfg, [], todo):
            raise ValueError("the run's own")
    err = capsys.readouterr().err
    assert "sculpt: warning: tidying the output" in err and error_lines(err) == []
    assert f"out/{LEASE_FILE}" not in keys(client)


def test_an_endpoint_in_the_environment_without_its_scheme_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:9000")
    assert cli.main(["run", "--input", "s3://bucket/in", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("sculpt: error: AWS_ENDPOINT_URL='127.0.0.1:9000' has no scheme: set it to "
                           "http://127.0.0.1:9000 or https://127.0.0.1:9000")
    assert not (tmp_path / "out").exists()
