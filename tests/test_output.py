import glob
import json
import os

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from sculpt import schema
from sculpt.io import storage
from sculpt.outputs.store import PARTS, STAGED, IncompatibleOutput, OutputStore
from sculpt.outputs.units import UnitWriter
from tests.doubles import FakeClock

JOB = {"fingerprint": "f1", "settings": {"stages": [{"name": "a", "params": {"model": "m1"}}]}, "model_ids": {"a": "m1"}}


def rows(unit, indices, size=None):
    out = []
    for i in indices:
        row = schema.new_row(unit.split("-")[0], i, f"sa_{i}", image_bytes=b"x", width=4, height=3, unit=unit)
        row["unit_end"] = {"size": size, "bytes_read": 100} if size else None
        out.append(row)
    return schema.to_table(out)


def test_unit_commits_once_all_rows_are_in_dedups_and_writes_marker_last(tmp_path):
    store = OutputStore(str(tmp_path))
    store.prepare(JOB)
    writer = UnitWriter(store, "sa_000001", JOB, flush_rows=2)
    writer.add(rows("sa_000001", [2, 0]))
    writer.add(rows("sa_000001", [0]))  # re-delivered after a retry
    assert not writer.complete
    writer.add(rows("sa_000001", [1, 1], size=3))  # a retried task's copy in the same batch as the first
    assert writer.complete and store.committed() == set()
    assert not os.path.exists(store.data_uri("sa_000001"))  # rows so far live in .sculpt/staged/_tmp only
    marker = writer.commit()
    assert store.committed() == {"sa_000001"}
    table = pq.read_table(store.data_uri("sa_000001"))
    assert sorted(table["index"].to_pylist()) == [0, 1, 2]
    assert table.schema.equals(schema.OUTPUT_SCHEMA) and "image_bytes" not in table.column_names
    assert set(table["status"].to_pylist()) == {schema.EMPTY}  # processed, no objects
    assert marker["rows"] == 3 and marker["errors"] == 0 and marker["input_bytes_read"] == 100
    assert json.loads(open(store.marker_uri("sa_000001")).read()) == marker
    assert os.listdir(tmp_path / STAGED) == ["_tmp"] and os.listdir(tmp_path / STAGED / "_tmp") == []  # moved up
    # a Parquet dataset reader over the output sees each row once and no bookkeeping files
    assert pads.dataset(str(tmp_path)).count_rows() == 3


def test_incomplete_unit_refuses_to_commit(tmp_path):
    store = OutputStore(str(tmp_path))
    writer = UnitWriter(store, "u", JOB)
    writer.add(rows("u", [0], size=2))
    with pytest.raises(RuntimeError, match="1 of 2 rows"):
        writer.commit()


def test_an_aborted_unit_leaves_no_temporary_file_even_when_closing_its_writer_fails(tmp_path):
    store = OutputStore(str(tmp_path))
    writer = UnitWriter(store, "u", JOB, flush_rows=1)
    writer.add(rows("u", [0], size=2))  # flushed: the unit's temporary file exists
    assert len(list((tmp_path / STAGED / "_tmp").iterdir())) == 1

    def full_disk():
        raise OSError(28, "No space left on device")

    writer.writer.close = full_disk
    writer.abort()
    assert list((tmp_path / STAGED / "_tmp").iterdir()) == [] and store.committed() == set()


def test_a_units_parquet_is_seen_among_the_data_only_once_its_marker_exists(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    store.prepare(JOB)
    for unit in ("sa_000001-00000", "sa_000001-00001"):
        writer = UnitWriter(store, unit, JOB)
        writer.add(rows(unit, [0, 1], size=2))
        if unit.endswith("1"):  # killed between its staged file and its marker
            monkeypatch.setattr(storage, "write_atomic", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
            with pytest.raises(KeyboardInterrupt):
                writer.commit()
            break
        monkeypatch.setattr(store, "publish", lambda unit: None)  # killed between its marker and the move
        writer.commit()
        monkeypatch.undo()
    monkeypatch.undo()
    staged = sorted(os.listdir(tmp_path / STAGED))
    assert staged == ["_tmp", "sa_000001-00000.parquet", "sa_000001-00001.parquet"]  # both written, staged
    assert store.committed() == {"sa_000001-00000"}
    assert glob.glob(str(tmp_path / "*.parquet")) == [] and pads.dataset(str(tmp_path)).count_rows() == 0

    assert store.prepare(JOB) == {"sa_000001-00000"}  # the next run finishes the move and drops what has no marker
    assert glob.glob(str(tmp_path / "*.parquet")) == [store.data_uri("sa_000001-00000")]
    assert sorted(os.listdir(tmp_path / STAGED)) == [] and pads.dataset(str(tmp_path)).count_rows() == 2


def test_error_counts_by_stage(tmp_path):
    store = OutputStore(str(tmp_path))
    table_rows = [schema.new_row("u", i, f"k{i}") for i in range(3)]
    schema.mark_error(table_rows[0], "read", "bad jpeg")
    schema.mark_error(table_rows[1], "caption", ValueError("boom"))
    for r in table_rows:
        r["unit_end"] = {"size": 3, "bytes_read": 10}
    writer = UnitWriter(store, "u", JOB)
    writer.add(schema.to_table(table_rows))
    marker = writer.commit()
    assert marker["errors"] == 2 and marker["errors_by_stage"] == {"read": 1, "caption": 1}
    assert pq.read_table(store.data_uri("u"))["error"].to_pylist()[1] == "caption: ValueError: boom"


def test_another_config_may_take_over_an_output_with_nothing_committed(tmp_path):
    store = OutputStore(str(tmp_path))
    store.prepare(JOB)
    other = {**JOB, "fingerprint": "f2", "settings": {"stages": []}}
    assert store.prepare(other) == set() and store.job()["fingerprint"] == "f2"


def test_rerun_with_another_config_is_refused_then_overwritten(tmp_path):
    store = OutputStore(str(tmp_path))
    store.prepare(JOB)
    writer = UnitWriter(store, "u", JOB)
    writer.add(rows("u", [0], size=1))
    writer.commit()
    (tmp_path / "notes.txt").write_text("user file")
    other = {**JOB, "fingerprint": "f2", "settings": {"stages": [{"name": "a", "params": {"model": "m2"}}]}}
    with pytest.raises(IncompatibleOutput, match=r"stages\[0\].params.model: 'm1' in the output, 'm2' now") as info:
        store.prepare(other)
    assert "--overwrite" in str(info.value)
    assert store.prepare(JOB) == {"u"}  # the same config resumes
    assert store.prepare(other, overwrite=True) == set()
    assert not list(tmp_path.glob("*.parquet")) and not list(tmp_path.glob("_markers/*"))
    assert (tmp_path / "notes.txt").read_text() == "user file"
    assert store.job()["fingerprint"] == "f2"


def test_overwrite_on_the_same_config_resumes_instead_of_wiping_the_jobs_work(tmp_path):
    store = OutputStore(str(tmp_path))
    store.prepare(JOB, overwrite=True)  # a job started with --overwrite, killed, then the same command again
    writer = UnitWriter(store, "u", JOB)
    writer.add(rows("u", [0], size=1))
    writer.commit()
    assert store.prepare(JOB, overwrite=True) == {"u"} and list(tmp_path.glob("*.parquet"))


def test_a_clear_stopped_part_way_leaves_no_unit_that_looks_committed(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path))
    store.prepare(JOB)
    for unit in ("u1", "u2"):
        writer = UnitWriter(store, unit, JOB)
        writer.add(rows(unit, [0], size=1))
        writer.commit()
    deleted, real_filesystem = [], storage.filesystem

    class StoppedAfterOneFile:  # the run is stopped once its first data file is gone
        def __init__(self, fs):
            self.fs = fs

        def delete_file(self, path):
            if deleted:
                raise KeyboardInterrupt
            deleted.append(path)
            self.fs.delete_file(path)

        def __getattr__(self, name):
            return getattr(self.fs, name)

    monkeypatch.setattr(storage, "filesystem", lambda *a, **k: (lambda fs, path: (StoppedAfterOneFile(fs), path))(
        *real_filesystem(*a, **k)))
    other = {**JOB, "fingerprint": "f2", "settings": {"stages": []}}
    with pytest.raises(KeyboardInterrupt):
        store.prepare(other, overwrite=True)
    monkeypatch.undo()
    assert deleted and store.committed() == set()  # markers went first: nothing looks committed
    assert store.job()["fingerprint"] == JOB["fingerprint"]  # the job file goes last
    with pytest.raises(IncompatibleOutput):
        store.prepare(other)  # still the first job's (its data half deleted): refused without --overwrite
    assert store.prepare(other, overwrite=True) == set() and not list(tmp_path.glob("*.parquet"))


def test_a_part_file_the_store_refuses_leaves_its_unit_pending_in_the_receipt(tmp_path):
    from sculpt.outputs.units import write_parts

    (tmp_path / PARTS).parent.parent.mkdir()
    (tmp_path / PARTS).parent.write_text("a file where the parts' folder goes")  # every part write fails (OSError)
    (receipt,) = write_parts(rows("sa_000001-00000", [0, 1], size=2), str(tmp_path), storage.S3Options()).to_pylist()
    assert receipt["part"] is None and receipt["transient_error"].startswith("write: "), receipt
    assert receipt["indices"] == [0, 1]


def test_a_commit_tried_again_after_its_marker_returns_that_marker_whatever_parts_are_left(tmp_path):
    from sculpt.outputs.units import commit_unit, write_parts

    store = OutputStore(str(tmp_path))
    store.prepare(JOB)
    parts = [write_parts(rows("sa_000001-00000", [i], size=2), store.uri, store.s3).to_pylist()[0]["part"]
             for i in (0, 1)]
    kept = (tmp_path / PARTS / parts[1]).read_bytes()
    marker = commit_unit(store, "sa_000001-00000", JOB, parts)
    left = tmp_path / PARTS / parts[1]
    left.parent.mkdir(parents=True)
    left.write_bytes(kept)  # the first try died deleting its parts
    assert commit_unit(store, "sa_000001-00000", JOB, parts) == marker
    assert not list((tmp_path / PARTS).rglob("*.parquet"))
    assert store.read_unit("sa_000001-00000").num_rows == 2


def test_a_redo_commit_tried_again_after_it_deleted_some_of_its_parts_returns_its_marker(tmp_path):
    from sculpt.outputs.units import commit_unit, write_parts

    store = OutputStore(str(tmp_path))
    store.prepare(JOB)
    unit = "sa_000001-00000"
    first = rows(unit, [0, 1, 2], size=3).to_pylist()
    for row in first[1:]:
        schema.mark_error(row, "a", "CUDA error: unspecified launch failure")
    (receipt,) = write_parts(schema.to_table(first), store.uri, store.s3).to_pylist()
    assert commit_unit(store, unit, JOB, [receipt["part"]])["errors"] == 2
    redone = [write_parts(rows(unit, [i]), store.uri, store.s3).to_pylist()[0]["part"] for i in (1, 2)]
    kept = (tmp_path / PARTS / redone[0]).read_bytes()
    marker = commit_unit(store, unit, JOB, redone, redo=True)
    assert marker["errors"] == 0 and store.read_unit(unit).num_rows == 3
    left = tmp_path / PARTS / redone[0]
    left.parent.mkdir(parents=True)
    left.write_bytes(kept)  # the first try died deleting its parts: one is left
    assert commit_unit(store, unit, JOB, redone, redo=True) == marker
    assert sorted(store.read_unit(unit)["index"].to_pylist()) == [0, 1, 2]


def test_a_commit_that_finds_another_configs_marker_writes_its_own_unit(tmp_path):
    """A job cleared with --overwrite whose commit landed late leaves its marker: not a retry of this commit."""
    from sculpt.outputs.units import commit_unit, write_parts

    store = OutputStore(str(tmp_path))
    store.prepare(JOB)
    old_job = {**JOB, "fingerprint": "f0"}
    (old,) = write_parts(rows("sa_000001-00000", [0], size=1), store.uri, store.s3).to_pylist()
    commit_unit(store, "sa_000001-00000", old_job, [old["part"]])
    (new,) = write_parts(rows("sa_000001-00000", [0, 1], size=2), store.uri, store.s3).to_pylist()
    marker = commit_unit(store, "sa_000001-00000", JOB, [new["part"]])
    assert marker["fingerprint"] == "f1" and store.read_unit("sa_000001-00000").num_rows == 2
    assert json.loads((tmp_path / ".sculpt" / "markers" / "sa_000001-00000.json").read_text())["fingerprint"] == "f1"


def test_a_commit_whose_job_lost_its_lease_writes_nothing(tmp_path):
    """A commit started before another job took the output over: its last look at the lease stops it."""
    from sculpt.io.lease import Lease, OutputBusy
    from sculpt.outputs.units import commit_unit, write_parts

    store = OutputStore(str(tmp_path))
    store.prepare(JOB)
    ours = Lease(str(tmp_path), ttl_seconds=1000).acquire()  # no renewal within the test
    (receipt,) = write_parts(rows("sa_000001-00000", [0], size=1), store.uri, store.s3).to_pylist()
    other = Lease(str(tmp_path))
    other.record["pid"] = 1
    assert other._write(ours.version)  # it found our lease stale and took the output over
    with pytest.raises(OutputBusy, match="this job lost its lease: .* held by pid 1"):
        commit_unit(store, "sa_000001-00000", JOB, [receipt["part"]], lease_owner=ours.record["owner"])
    assert store.committed() == set() and not os.path.exists(store.data_uri("sa_000001-00000"))
    marker = commit_unit(store, "sa_000001-00000", JOB, [receipt["part"]], lease_owner=other.record["owner"])
    assert marker["rows"] == 1 and store.committed() == {"sa_000001-00000"}
    ours.release()
    assert (tmp_path / "_lease.json").exists()  # the other job's, not ours to delete


def test_readers_of_a_half_written_output_see_committed_units_once_and_no_part_files(tmp_path):
    """Mid-run: one unit committed, another's rows in part files, a third's half-gathered in _tmp. pyarrow over OUT
    and Hugging Face `datasets` over the data files (as the README says) see the committed rows, each once."""
    datasets = pytest.importorskip("datasets")
    from sculpt.outputs.units import commit_unit, write_parts

    store = OutputStore(str(tmp_path))
    store.prepare(JOB)
    (receipt,) = write_parts(rows("sa_000001-00000", [0, 1, 2], size=3), store.uri, store.s3).to_pylist()
    commit_unit(store, "sa_000001-00000", JOB, [receipt["part"]])
    write_parts(rows("sa_000002-00000", [0, 1], size=3), store.uri, store.s3)  # awaiting its last row
    half = UnitWriter(store, "sa_000003-00000", JOB, flush_rows=1)
    half.add(rows("sa_000003-00000", [0, 1]))  # a commit cut off while gathering
    assert list((tmp_path / PARTS).glob("sa_000002-00000/*.parquet"))
    assert list((tmp_path / STAGED).rglob("sa_000003*"))
    expected = [("sa_000001", i) for i in range(3)]
    data_files = f"{tmp_path}/*.parquet"
    seen = {"pyarrow": pads.dataset(str(tmp_path), format="parquet").to_table(columns=["shard", "index"]).to_pydict(),
            "datasets files": datasets.load_dataset("parquet", data_files=data_files, split="train").to_dict()}
    for reader, table in seen.items():
        assert sorted(zip(table["shard"], table["index"])) == expected, reader


def test_the_output_lease_refuses_a_second_job_and_frees_a_dead_ones(tmp_path):
    import subprocess
    import sys

    from sculpt.io.lease import LEASE_FILE, Lease, OutputBusy

    out = str(tmp_path / "out")
    held = Lease(out).acquire()
    with pytest.raises(OutputBusy, match=r"held by pid \d+ on") as refused:
        Lease(out).acquire()
    from sculpt import errors

    assert errors.job_error(refused.value) == str(refused.value)  # annotate.py: one `sculpt: error:` line, exit 2
    held.release()
    assert not (tmp_path / "out" / LEASE_FILE).exists()
    Lease(out).acquire().release()  # free again

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = Lease(out)
    stale.record["pid"] = int(dead.stdout)
    assert stale._write(None)  # a lease left by a process that has died, on this machine: taken over at once
    taken = Lease(out).acquire()
    assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["owner"] == taken.record["owner"]
    taken.release()

    clock = FakeClock()
    far = Lease(out, clock=clock)
    far.record["host"] = "another-host"
    assert far._write(None)
    clock.advance(far.ttl + 1)  # held elsewhere, but not renewed within its ttl: free
    Lease(out, clock=clock).acquire().release()


def test_a_job_whose_lease_another_job_took_over_learns_it_at_its_next_renewal(tmp_path):
    from sculpt.io.lease import Lease, OutputBusy

    out, clock = str(tmp_path / "out"), FakeClock()
    slow = Lease(out, clock=clock).acquire()  # renews every ttl / 3
    clock.settle(slow._renewer)
    slow.check()
    other = Lease(out, clock=clock)
    other.record["pid"] = 1
    # another job takes the output over (as after a stall past the ttl) between two renewals
    assert other._write(slow.version)
    assert slow.lost is None
    clock.advance(slow.ttl / 3)  # the next renewal
    with pytest.raises(OutputBusy, match="this job lost its lease: .* held by pid 1 on"):
        slow.check()
    slow.release()
    lease_file = tmp_path / "out" / "_lease.json"
    assert json.loads(lease_file.read_text())["owner"] == other.record["owner"]  # not ours to delete


def lease_with_outage(out: str, monkeypatch, clock):
    """A held lease (the jobs' ttl) whose store refuses every write (an unreachable S3) while ``outage`` is set; its
    renewals come as the test advances ``clock`` (a FakeClock)."""
    import errno
    import threading

    from sculpt.io.lease import Lease

    lease, outage = Lease(out, clock=clock).acquire(), threading.Event()
    clock.settle(lease._renewer)  # waiting for its first renewal
    real = lease._write

    def write(expected):
        if outage.is_set():
            raise OSError(errno.EHOSTUNREACH, "No route to host")
        return real(expected)

    monkeypatch.setattr(lease, "_write", write)
    return lease, outage


def check_in_thread(lease, clock) -> tuple:
    """``lease.check()`` in a thread, once it waits (or has returned)."""
    import threading

    raised = []

    def check():
        try:
            lease.check()
        except Exception as exc:
            raised.append(exc)

    thread = threading.Thread(target=check)
    thread.start()
    clock.settle(thread)
    return thread, raised


def test_a_job_whose_lease_cannot_be_renewed_commits_nothing_until_a_renewal_lands(tmp_path, monkeypatch):
    """Past half its ttl unrenewed, check() waits (no receipt is taken in, so nothing is committed): another job
    could take the lease over after the whole ttl. A renewal that lands then lets the job go on."""
    clock = FakeClock()
    lease, outage = lease_with_outage(str(tmp_path / "out"), monkeypatch, clock)  # renews every ttl / 3
    ttl = lease.ttl
    outage.set()
    clock.advance(ttl / 2 + 1)  # past ttl / 2 since the last renewal (the one due at ttl / 3 failed)
    thread, raised = check_in_thread(lease, clock)
    assert thread.is_alive()  # waiting, not committing
    outage.clear()  # the store answers again: the next renewal (within ttl / 12) lands
    cleared, step = clock.monotonic(), 0.5
    clock.advance_until(lambda: not thread.is_alive(), step, within=ttl / 4)
    assert not thread.is_alive() and raised == [] and lease.lost is None
    assert lease.renewed_at - cleared <= ttl / 12 + step
    assert clock.monotonic() - lease.renewed_at < ttl / 2
    lease.release()
    assert not (tmp_path / "out" / "_lease.json").exists()


def test_a_job_whose_lease_was_taken_over_during_an_outage_stops_when_the_store_answers(tmp_path, monkeypatch):
    from sculpt.io.lease import Lease, OutputBusy

    clock = FakeClock()
    lease, outage = lease_with_outage(str(tmp_path / "out"), monkeypatch, clock)
    outage.set()
    clock.advance(lease.ttl / 2 + 1)
    thread, raised = check_in_thread(lease, clock)
    other = Lease(str(tmp_path / "out"), clock=clock)
    other.record["pid"] = 1
    assert other._write(lease.version)  # it found the lease stale and took the output over
    clock.advance(1)  # a poll of check()'s
    assert thread.is_alive()
    outage.clear()  # our renewal is refused: the file is no longer as we wrote it
    clock.advance_until(lambda: not thread.is_alive(), 0.5, within=lease.ttl / 4)
    assert not thread.is_alive() and len(raised) == 1 and isinstance(raised[0], OutputBusy)
    assert "this job lost its lease" in str(raised[0])
    lease.release()
    assert json.loads((tmp_path / "out" / "_lease.json").read_text())["owner"] == other.record["owner"]


def test_a_job_whose_lease_renewals_keep_failing_stops_with_the_last_error(tmp_path, monkeypatch):
    from sculpt.io import lease as lease_module

    monkeypatch.setattr(lease_module, "STALL_TTLS", 3)
    clock = FakeClock()
    lease, outage = lease_with_outage(str(tmp_path / "out"), monkeypatch, clock)
    outage.set()  # for good: lost credentials, a revoked permission
    clock.advance(lease.ttl / 2 + 1)  # past ttl / 2
    thread, raised = check_in_thread(lease, clock)
    clock.advance_until(lambda: not thread.is_alive(), lease.ttl / 12, within=(3 + 1) * lease.ttl)
    assert not thread.is_alive() and len(raised) == 1 and isinstance(raised[0], lease_module.OutputBusy)
    assert "could not renew its lease" in str(raised[0]) and "No route to host" in str(raised[0])
    lease.release()


def test_a_lease_that_cannot_be_given_back_leaves_the_jobs_own_outcome(tmp_path, monkeypatch, capsys):
    import errno

    lease, outage = lease_with_outage(str(tmp_path / "out"), monkeypatch, FakeClock())  # no renewal in the test

    def unreachable():
        raise OSError(errno.EHOSTUNREACH, "No route to host")

    monkeypatch.setattr(lease, "_read", unreachable)
    lease.release()  # no exception to hide the job's own error (in a finally)
    assert "could not give back the lease" in capsys.readouterr().out


def test_a_lease_counts_from_its_stamp_not_from_when_the_store_answered(tmp_path, monkeypatch):
    """A renewal the store answers late (S3's retries): the other jobs read the stamp, so the ttl runs from it."""
    from sculpt.io import lease as lease_module

    clock = FakeClock()
    lease = lease_module.Lease(str(tmp_path / "out"), clock=clock)
    lease._write(None)
    real = lease_module.storage.write_atomic
    late = lease.ttl * 2 / 3

    def slow(*args, **kwargs):
        clock.advance(late)
        return real(*args, **kwargs)

    monkeypatch.setattr(lease_module.storage, "write_atomic", slow)
    assert lease.renew()
    assert clock.monotonic() - lease.renewed_at >= late  # past half the ttl: check() would wait for the next one
    stamp = json.loads((tmp_path / "out" / "_lease.json").read_text())["renewed"]
    lease.version = "lost"  # the answer lost: the lease read back counts from its own stamp too
    assert lease._written_by_us() and abs((clock.monotonic() - lease.renewed_at) - (clock.time() - stamp)) < 0.1


def test_a_lease_is_taken_where_the_disk_has_no_hard_links(tmp_path, monkeypatch):
    import errno

    from sculpt.io import lease as lease_module

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")  # gcsfuse, blobfuse, some SMB mounts

    monkeypatch.setattr(lease_module.os, "link", no_links)
    out = str(tmp_path / "out")
    held = lease_module.Lease(out).acquire()
    assert json.loads((tmp_path / "out" / "_lease.json").read_text())["owner"] == held.record["owner"]
    with pytest.raises(lease_module.OutputBusy):
        lease_module.Lease(out).acquire()
    held.release()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no lease, no temp file, no lock file


def test_a_lease_write_that_landed_though_its_answer_was_lost_is_still_ours(tmp_path):
    from sculpt.io.lease import Lease

    out = str(tmp_path / "out")
    lease = Lease(out, ttl_seconds=1000).acquire()  # no renewal in the test's time
    assert lease._write(lease.version)
    lease.version = "what the lost answer would have said"  # the store has our write; we never learnt its version
    assert lease.renew() and lease.lost is None
    assert lease.renew()  # from the version read back
    lease.release()
    assert not (tmp_path / "out" / "_lease.json").exists()


def test_an_empty_lease_file_is_nobodys(tmp_path):
    from sculpt.io.lease import Lease

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_lease.json").write_text("")  # a create cut short (a full disk, a kill)
    lease = Lease(str(tmp_path / "out")).acquire()
    assert json.loads((tmp_path / "out" / "_lease.json").read_text())["owner"] == lease.record["owner"]
    lease.release()
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != "_lease.json.lock"]  # no temp file
    assert not list((tmp_path / "out").iterdir())  # nor a lock file, nor the renewals' temporary folder


def test_two_jobs_taking_over_a_stale_lease_at_once_do_not_both_win(tmp_path, monkeypatch):
    import threading
    import time

    from sculpt.io import lease as lease_module
    from sculpt.io import storage
    from sculpt.io.lease import Lease, OutputBusy

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_lease.json").write_text(json.dumps({"owner": "gone", "host": "another-host", "pid": 1,
                                                              "renewed": 0}))  # not renewed for ages: free
    free, both_read = Lease._free, threading.Barrier(2, timeout=60)
    locked, write_atomic, at_lock, changed = lease_module._locked, storage.write_atomic, [], threading.Condition()

    def free_once_both_read(self, holder):  # both takers have read the stale lease before either writes
        answer = free(self, holder)
        both_read.wait()
        return answer

    def counted(path):
        with changed:
            at_lock.append(path)
            changed.notify_all()
        return locked(path)

    def slow_write(*args, **kwargs):  # the first to hold the lock writes once the other has come to the lock too
        with changed:
            assert changed.wait_for(lambda: len(at_lock) >= 2, timeout=60)
        time.sleep(0.2)  # time for a lock that does not hold to show (the other would compare and write now); with
        write_atomic(*args, **kwargs)  # the lock, the other waits however long this takes: the outcome is the same

    monkeypatch.setattr(Lease, "_free", free_once_both_read)
    monkeypatch.setattr(lease_module, "_locked", counted)
    monkeypatch.setattr(storage, "write_atomic", slow_write)
    outcomes, leases = [], []

    def take():
        try:
            leases.append(Lease(str(tmp_path / "out")).acquire())
            outcomes.append("won")
        except OutputBusy:
            outcomes.append("refused")

    takers = [threading.Thread(target=take) for _ in range(2)]
    for taker in takers:
        taker.start()
    for taker in takers:
        taker.join()
    assert sorted(outcomes) == ["refused", "won"]
    leases[0].release()


def test_the_local_lease_lock_has_one_holder_at_a_time_and_its_file_outlives_none(tmp_path):
    """The lock file is deleted by each holder as it lets go, while others wait on it: a waiter then holds a file
    that is gone, sees it, and locks the one the path names now. Never two holders; no file left."""
    import threading
    import time

    from sculpt.io import lease as lease_module

    path = str(tmp_path / "_lease.json")
    (tmp_path / "_lease.json.lock").write_text("")  # an older sculpt's, kept for good
    inside, overlaps, turns = [], [], []

    def hold():
        for _ in range(40):
            with lease_module._locked(path):
                inside.append(1)
                overlaps.append(len(inside))
                time.sleep(0.0005)
                inside.pop()
                turns.append(1)

    holders = [threading.Thread(target=hold) for _ in range(6)]  # each its own descriptor: flock tells them apart
    for holder in holders:
        holder.start()
    for holder in holders:
        holder.join()
    assert len(turns) == 240 and set(overlaps) == {1}
    assert list(tmp_path.iterdir()) == []
