"""Transient faults are retried and never committed; permanent ones are error rows; the error budget stops a job;
a rerun redoes error rows. On a local Ray with logical GPUs and the Faulty test stage (tests/doubles.py)."""

import json
import os

import pyarrow.dataset as pads
import pytest

from sculpt import config
from sculpt.outputs import units
from sculpt.engine import planning
from sculpt.engine import pipeline
from sculpt.engine.job import annotate as run_job, take_output
from sculpt.outputs.store import OutputStore


def faulty(**params):
    return {"name": "faulty", "class": "tests.doubles:Faulty", "cpus": 0.5, "gpus": 0.25, "batch_size": 2,
            "params": params}


def job(inputs, out, stages, *extra):
    overrides = [f"input.shards={json.dumps([str(p) for p in inputs])}", f"output.path={out}", f"stages={json.dumps(stages)}",
                 "input.batch_images=2", "progress_seconds=1", "faults.backoff_seconds=0.01", *extra]
    cfg = config.load(None, overrides)
    return cfg, [config.build_stage(s) for s in cfg.stages]


def rows_of(out):
    rows = pads.dataset(str(out), format="parquet").to_table().to_pylist()
    return sorted(rows, key=lambda r: (r["shard"], r["index"]))


def test_out_of_memory_is_retried_and_never_written(local_ray, sample_shards, tmp_path):
    cfg, stages = job(sample_shards[:2], tmp_path / "out", [faulty(transient_keys=["sa_1", "sa_5"], transient_times=2)])
    summary = run_job(cfg, stages)
    rows = rows_of(tmp_path / "out")
    assert summary["committed_now"] == 2 and summary["pending"] == {}
    assert len(rows) == 8 and all(r["status"] == "empty" and r["caption"] == "faulty;" for r in rows)


def test_a_fault_that_outlasts_its_retries_leaves_the_unit_pending_and_a_rerun_finishes_it(local_ray, sample_shards, tmp_path):
    flag = tmp_path / "fault-on"
    flag.write_text("")
    shard = os.path.basename(sample_shards[1])[: -len(".tar")]
    unit = f"{shard}-00000"
    cfg, stages = job(sample_shards, tmp_path / "out", [faulty(fault_file=str(flag), fault_shards=[shard])],
                      "faults.attempts=2")
    summary = run_job(cfg, stages)
    assert list(summary["pending"]) == [unit] and "ConnectionResetError" in summary["pending"][unit]
    assert summary["committed_now"] == 2
    store = OutputStore(str(tmp_path / "out"))
    assert unit not in store.committed() and not os.path.exists(store.data_uri(unit))  # nothing short, nothing partial
    assert {r["shard"] + "-00000" for r in rows_of(tmp_path / "out")} == store.committed()  # one chunk per shard

    flag.unlink()  # the fault is gone: the same command finishes the job, each image exactly once
    summary = run_job(cfg, stages)
    rows = rows_of(tmp_path / "out")
    assert summary["committed_now"] == 1 and summary["pending"] == {}
    assert len(rows) == 12 and len({(r["shard"], r["index"]) for r in rows}) == 12
    assert all(r["status"] == "empty" for r in rows)


def test_a_fault_that_breaks_the_device_restarts_the_actor_which_does_the_batch_again(local_ray, sample_shards, tmp_path):
    flag, pids = tmp_path / "device-fault", tmp_path / "pids"
    flag.write_text("")
    pids.mkdir()
    stage = {**faulty(device_fault_keys=["sa_2"], device_fault_file=str(flag), pid_dir=str(pids)), "actors": 1}
    cfg, stages = job(sample_shards, tmp_path / "out", [stage])
    summary = run_job(cfg, stages)
    assert not flag.exists()  # the fault happened
    assert len(os.listdir(pids)) == 2  # in one process, and a new one did the rest
    rows = rows_of(tmp_path / "out")
    assert summary["committed_now"] == 3 and summary["pending"] == {}
    assert len(rows) == 12 and all(r["status"] == "empty" and r["caption"] == "faulty;" for r in rows)


def test_a_batch_that_breaks_the_device_every_time_costs_two_restarts_then_waits_for_the_next_run(local_ray, sample_shards,
                                                                                                 tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    shard = os.path.basename(sample_shards[0])[: -len(".tar")]
    # two batches at once in the one actor: the one beside the faulty batch meets the broken device too
    stage = {**faulty(device_fault_keys=["sa_2"], pid_dir=str(pids), hold_seconds=0.3), "actors": 1,
             "batches_in_flight": 2}
    cfg, stages = job(sample_shards, tmp_path / "out", [stage])
    summary = run_job(cfg, stages)
    assert len(os.listdir(pids)) == 3  # the first process and two restarts, no more
    assert list(summary["pending"]) == [f"{shard}-00000"] and "broke the device 2 times" in summary["pending"][f"{shard}-00000"]
    assert summary["committed_now"] == 2
    assert {r["shard"] for r in rows_of(tmp_path / "out")} == {"sa_000001", "sa_000002"}


def test_a_stage_failing_most_images_stops_the_job_before_it_commits(local_ray, sample_shards, tmp_path):
    broken = tmp_path / "broken"
    broken.write_text("sa_1 sa_2 sa_3 sa_4 sa_5 sa_6 sa_7 sa_8 sa_9 sa_10 sa_11 sa_12")
    cfg, stages = job(sample_shards[:1], tmp_path / "out", [faulty(broken_file=str(broken))])
    with pytest.raises(units.ErrorBudgetExceeded, match=r"(?s)stage faulty failed 4 of 4 images .* injected permanent"):
        run_job(cfg, stages)
    assert OutputStore(str(tmp_path / "out")).committed() == set()


@pytest.mark.parametrize("message, transient, breaks", [
    ("CUDA out of memory. Tried to allocate 2.00 GiB", True, False),
    ("CUDA error: an illegal memory access was encountered", True, True),
    ("CUDA error: uncorrectable ECC error encountered", True, True),
    ("CUDA error: the launch timed out and was terminated", True, True),
    ("CUDA error: unknown error", True, True),
    ("CUDA error: no kernel image is available for execution on the device", False, False),
    ("CUDA error: CUDA driver version is insufficient for CUDA runtime version", False, False),
    ("unknown error", False, False),
])
def test_cuda_faults_are_told_apart(message, transient, breaks):
    from sculpt import errors

    fault = RuntimeError(message)
    assert (errors.is_transient(fault), errors.breaks_device(fault)) == (transient, breaks)


def test_redo_errors_reprocesses_only_the_error_rows(local_ray, sample_shards, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.write_text("sa_2 sa_6")  # one image in each of two shards: under the error budget
    stages = [faulty(broken_file=str(broken))]
    cfg, built = job(sample_shards, tmp_path / "out", stages, "faults.min_errors=2")
    run_job(cfg, built)
    before = rows_of(tmp_path / "out")
    failed = {(r["shard"], r["index"]) for r in before if r["status"] == "error"}
    assert len(failed) == 2 and all("injected permanent failure" in r["error"] for r in before if r["status"] == "error")

    broken.unlink()  # the cause is fixed
    # a job over part of the output's shards redoes the errors of its own shards only
    narrow = planning.plan(*job(sample_shards[:1], tmp_path / "out", stages, "output.redo_errors=true"))
    assert list(map(len, narrow.redo.values())) == [1] and len(narrow.segments) == 1
    cfg, built = job(sample_shards, tmp_path / "out", stages, "faults.min_errors=2", "output.redo_errors=true")
    todo = planning.plan(cfg, built)
    assert sorted(map(len, todo.redo.values())) == [1, 1] and len(todo.segments) == 2  # only the two units with errors
    capsys.readouterr()
    summary = run_job(cfg, built, todo)
    progress = [line for line in capsys.readouterr().out.splitlines() if "committed sa_" in line]
    n = len(sample_shards)
    assert len(progress) == 2 and all(f"shards {n}/{n} " in line for line in progress)  # done shards count once
    after = rows_of(tmp_path / "out")
    assert summary["committed_now"] == 2 and summary["errors"] == 0 and summary["images"] == 2  # the redone ones
    assert len(after) == 12 and len({(r["shard"], r["index"]) for r in after}) == 12
    assert all(r["status"] == "empty" for r in after)
    unchanged = [(b, a) for b, a in zip(before, after) if (b["shard"], b["index"]) not in failed]
    assert len(unchanged) == 10 and all(b == a for b, a in unchanged)  # good rows kept as they were
    markers = {m["unit"]: m for m in OutputStore(str(tmp_path / "out")).markers()}
    assert sum(m["rows"] for m in markers.values()) == 12 and sum(m["errors"] for m in markers.values()) == 0


def test_redo_errors_of_a_chunk_whose_predecessor_a_kill_left_uncommitted(local_ray, sample_shards, tmp_path):
    broken, out = tmp_path / "broken", tmp_path / "out"
    broken.write_text("sa_4")  # the shard's last image: in its second chunk
    stages = [faulty(broken_file=str(broken))]
    cfg, built = job(sample_shards[:1], out, stages, "input.chunk_images=2", "faults.min_errors=2")
    run_job(cfg, built)
    first = "sa_000000-00000"  # commits come in any order: a kill may leave the first chunk uncommitted
    (out / ".sculpt" / "markers" / f"{first}.json").unlink()
    (out / f"{first}.parquet").unlink()

    broken.unlink()
    cfg, built = job(sample_shards[:1], out, stages, "input.chunk_images=2", "faults.min_errors=2", "output.redo_errors=true")
    todo = planning.plan(cfg, built)
    assert list(todo.redo) == ["sa_000000-00001"] and len(todo.segments) == 2  # the first chunk, then the redo
    summary = run_job(cfg, built, todo)
    after = rows_of(out)
    assert summary["committed_now"] == 2 and not summary["pending"]
    assert sorted(r["index"] for r in after) == [0, 1, 2, 3] and all(r["status"] == "empty" for r in after)


def annotate(*argv):
    """workflows/annotate.py in a fresh interpreter: (exit code, stdout, stderr)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "workflows", "annotate.py"), *argv], capture_output=True,
                          text=True, timeout=120, cwd=root)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("argv, says", [
    (["--set", "input.readers=-1"], "input: readers=-1: must be an integer >= 1"),
    (["--input", "s3://bucket/sa1b/", "--s3-endpoint", "127.0.0.1:9"], "has no scheme: write http://127.0.0.1:9"),
    (["--input", "s3://bucket/sa1b/", "--s3-endpoint", "http://127.0.0.1:9", "--set", "s3.retry_attempts=1",
      "--set", "s3.connect_timeout=1"], "S3 is unreachable or refused the request"),
    (["--config", "/dev/null/nope.yaml"], "or pass the right --config"),
])
def test_job_level_failures_end_in_one_line_naming_the_fix(sample_shards, tmp_path, argv, says):
    if argv[0] != "--input" and argv[0] != "--config":
        argv = ["--input", sample_shards[0], "--output", str(tmp_path / "out"), *argv]
    code, out, err = annotate("--output", str(tmp_path / "out"), *argv) if "--output" not in argv else annotate(*argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines and lines[-1].startswith("sculpt: error: ") and says in lines[-1], err[-2000:]
    assert "Traceback" not in err and "Started a local Ray" not in err + out  # refused before any cluster starts


def test_a_bad_yaml_file_is_one_line(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("input: {shards: [a, b\n")
    code, _, err = annotate("--config", str(bad))
    assert code == 2 and err.strip().startswith("sculpt: error: the config file") and "is not valid YAML" in err
    assert len(err.strip().splitlines()) == 1


def test_a_failed_commit_leaves_that_unit_pending_and_a_full_disk_stops_the_job(local_ray, sample_shards, tmp_path):
    import errno

    import io

    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ConnectionClosedError

    from sculpt import errors
    from tests.doubles import FailingStore

    unit = os.path.basename(sample_shards[0])[: -len(".tar")] + "-00000"
    out = tmp_path / "out"
    (out / "_markers" / "_tmp").mkdir(parents=True)
    (out / "_markers" / "_tmp" / "stale.json.1234").write_text("{")  # a killed run's half-written marker
    cfg, stages = job(sample_shards, out, [faulty()])
    todo = planning.plan(cfg, stages)
    todo.store = FailingStore(str(out), unit, errno.EIO)  # commits run in the cluster: the store travels there
    summary = run_job(cfg, stages, todo)
    assert list(summary["pending"]) == [unit] and summary["pending"][unit].startswith("write: OSError")
    assert summary["committed_now"] == 2 and unit not in OutputStore(str(out)).committed()
    assert not list((out / "_markers" / "_tmp").glob("stale*")) and not list((out / "_tmp").glob(f"{unit}*"))

    # boto3's own errors past its retries (not OSError), one that does not pickle (a dropped connection holding its
    # request's stream), and a commit whose worker died on every try: pending too
    def dropped():
        return ConnectionClosedError(endpoint_url="http://127.0.0.1:9", request=io.BufferedReader(io.BytesIO(b"")))

    for fault, says in [(S3UploadFailedError("Failed to upload: SlowDown (reached max retries: 9)"), "write: S3UploadFailedError"),
                        (dropped, "write: ConnectionClosedError"), ("exit", "write: WorkerCrashedError")]:
        todo = planning.plan(cfg, stages)
        todo.store = FailingStore(str(out), unit, fault)
        summary = run_job(cfg, stages, todo)
        assert list(summary["pending"]) == [unit] and summary["pending"][unit].startswith(says), summary["pending"]
        assert summary["committed_now"] == 0 and unit not in OutputStore(str(out)).committed()

    todo = planning.plan(cfg, stages)
    todo.store = FailingStore(str(out), unit, errno.ENOSPC)
    with pytest.raises(OSError) as caught:
        run_job(cfg, stages, todo)
    assert errors.job_error(caught.value).startswith("no space left on the output's disk")


def test_a_job_refused_after_planning_gives_its_output_back(sample_shards, tmp_path):
    out = tmp_path / "out"
    code, _, err = annotate("--input", sample_shards[0], "--output", str(out), "--set", "ray.num_cpus=1",
                            "--set", "ray.num_gpus=0")
    assert code == 2 and "GPU at once, the cluster has 0" in err.splitlines()[-1], err[-2000:]
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []  # planned, refused before writing anything


def test_a_job_that_lost_its_output_to_another_stops_before_committing_more(local_ray, sample_shards, tmp_path):
    from sculpt.io.lease import OutputBusy

    cfg, stages = job(sample_shards, tmp_path / "out", [faulty()])
    todo = planning.plan(cfg, stages)
    with pytest.raises(OutputBusy, match="lost its lease"):
        with take_output(cfg, stages, todo) as (todo, lease):
            lease.lost = "this job lost its lease: another job is writing this output"  # what the renewer finds
            pipeline.run(cfg, stages, todo, lease)
    assert OutputStore(str(tmp_path / "out")).committed() == set()
