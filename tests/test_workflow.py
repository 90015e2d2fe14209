"""The streaming workflow on a local Ray with 4 logical GPUs: placement, accounting, faults, resume."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow.dataset as pads

from sculpt import config
from sculpt.engine import dataset, progress
from sculpt.engine.job import annotate as run_job
from sculpt.testing import samples
from sculpt.io import shards
from sculpt.cli import status
from sculpt.outputs.store import OutputStore
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hold(name, log_dir, gpus, actors=1, seconds=0.0, batch_size=2, **params):
    return {
        "name": name,
        "class": "tests.doubles:HoldGpu",
        "gpus": gpus,
        "cpus": 0.5,
        "actors": actors,
        "batch_size": batch_size,
        "params": {"seconds_per_image": seconds, "log_dir": str(log_dir), **params},
    }


def job(inputs, out, stages, *extra):
    overrides = [f"input.shards={json.dumps([str(p) for p in inputs])}", f"output.path={out}", f"stages={json.dumps(stages)}",
                 "input.batch_images=2", "progress_seconds=1", *extra]
    cfg = config.load(None, overrides)
    return cfg, [config.build_stage(s) for s in cfg.stages]


def output_rows(out):
    return pads.dataset(str(out), format="parquet").to_table().to_pylist()


def actor_logs(log_dir):
    return [json.load(open(p)) for p in glob.glob(os.path.join(log_dir, "*.json"))]


def test_three_stage_chain_places_actors_on_gpus_and_accounts_for_every_image(local_ray, sample_shards, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    stages = [hold("a", logs, 0.5, actors=2), hold("b", logs, 0.25, actors=2), hold("c", logs, 1)]
    stages.append({"name": "m", "class": "tests.doubles:ThresholdMasker", "gpus": 0.25, "cpus": 0.5})
    cfg, built = job(sample_shards, tmp_path / "out", stages)
    summary = run_job(cfg, built)

    rows = output_rows(tmp_path / "out")
    assert summary["images"] == len(rows) == 12 and summary["errors"] == 0
    assert sorted((r["shard"], r["index"]) for r in rows) == [(f"sa_00000{s}", i) for s in range(3) for i in range(4)]
    assert {r["caption"] for r in rows} == {"a;b;c;"}  # every stage saw every image, in order
    assert all(r["status"] == "ok" and len(r["objects"]) == 1 for r in rows)
    # rows are written in the cluster: the driver receives receipts (unit, part file, indices), neither the
    # images nor the annotations (here one noisy RLE mask of tens of KB per image)
    masks = sum(len(r["objects"][0]["mask"]["counts"]) for r in rows) / len(rows)
    assert masks > 10_000 and 0 < summary["driver_bytes_per_image"] < 1_000

    records = actor_logs(logs)
    assert sorted(r["stage"] for r in records) == ["a", "a", "b", "b", "c"]
    load: dict[str, float] = {}
    fraction = {"a": 0.5, "b": 0.25, "c": 1.0}
    for record in records:
        assert len(record["gpu_ids"]) == 1 and record["cuda_visible_devices"] == record["gpu_ids"][0]
        load[record["gpu_ids"][0]] = load.get(record["gpu_ids"][0], 0) + fraction[record["stage"]]
    assert all(total <= 1.0 for total in load.values()), load  # no GPU is over-committed
    whole = next(r["gpu_ids"][0] for r in records if r["stage"] == "c")
    assert load[whole] == 1.0  # the whole-GPU actor shares its GPU with nobody


def test_bad_input_is_recorded_per_image_and_the_run_goes_on(local_ray, sample_shards, tmp_path):
    ok = helpers.encoded(helpers.photo())
    broken = tmp_path / "in" / "sa_000100.tar"
    broken.parent.mkdir()
    samples.write_tar(str(broken), helpers.pair(1, ok) + helpers.pair(2, b"garbage") + [("sa_3.jpg", ok)])
    truncated = tmp_path / "in" / "sa_000101.tar"
    data = open(sample_shards[2], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    logs = tmp_path / "logs"
    logs.mkdir()
    cfg, built = job([sample_shards[1], broken, truncated], tmp_path / "out", [hold("a", logs, 0.5, fail_keys=["sa_1"])])
    summary = run_job(cfg, built)

    rows = output_rows(tmp_path / "out")
    markers = {m["unit"]: m for m in OutputStore(str(tmp_path / "out")).markers()}
    assert summary["images"] == len(rows) == sum(m["rows"] for m in markers.values())
    assert summary["errors"] == sum(r["status"] == "error" for r in rows)
    broken_rows = {r["image_key"]: r for r in rows if r["shard"] == "sa_000100"}
    assert broken_rows["sa_1"]["error"] == "a: RuntimeError: injected failure on sa_1"
    assert broken_rows["sa_2"]["error"].startswith("read: not a readable image")
    assert "has no .json" in broken_rows["sa_3"]["error"]
    assert markers["sa_000100-00000"]["errors_by_stage"] == {"a": 1, "read": 2}
    cut = sorted((r for r in rows if r["shard"] == "sa_000101"), key=lambda r: r["index"])
    assert cut[-1]["status"] == "error" and cut[0]["status"] == "empty"  # processed, no objects (no model stage)
    assert markers["sa_000001-00000"]["errors"] == 0 and markers["sa_000001-00000"]["rows"] == 4


def test_killed_stage_actor_is_replaced_and_output_is_exact(local_ray, sample_shards, tmp_path):
    logs, work, pause = tmp_path / "logs", tmp_path / "work", tmp_path / "pause"
    logs.mkdir()
    work.mkdir()
    pause.touch()  # b works on 2 images, then waits for the kill
    stages = [hold("a", logs, 0.5),
              hold("b", logs, 0.5, seconds=0.4, batch_size=1, work_log=str(work), pause_file=str(pause), pause_after=2)]
    cfg, built = job(sample_shards, tmp_path / "out", stages, "input.chunk_images=3")  # chunks of 3 and of 1
    killed = []

    def worked(pid):
        path = work / f"{pid}.txt"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def kill_b_once_it_works():
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and not killed:
                b = [r for r in actor_logs(logs) if r["stage"] == "b"]
                if b and worked(b[0]["pid"]) >= 2:  # it took a few batches first, and waits at the pause
                    os.kill(b[0]["pid"], signal.SIGKILL)
                    killed.append(b[0]["pid"])
                time.sleep(0.1)
        finally:
            pause.unlink()  # its replacement works on (or, if the kill never came, the job ends)

    killer = threading.Thread(target=kill_b_once_it_works)
    killer.start()
    summary = run_job(cfg, built)
    killer.join()

    assert killed, "the stage actor was never killed"
    assert len([r for r in actor_logs(logs) if r["stage"] == "b"]) >= 2  # a replacement actor took over
    rows = output_rows(tmp_path / "out")
    assert sorted((r["shard"], r["index"]) for r in rows) == [(f"sa_00000{s}", i) for s in range(3) for i in range(4)]
    assert summary["images"] == 12 and all(r["caption"] == "a;b;" and r["status"] == "empty" for r in rows)
    assert sorted(OutputStore(str(tmp_path / "out")).committed()) == [f"sa_00000{s}-0000{c}" for s in range(3) for c in (0, 1)]


def _annotate(args, **kwargs):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "workflows", "annotate.py"), *args], cwd=ROOT, **kwargs)


def test_killed_driver_mid_shard_then_rerun_reads_no_byte_of_committed_chunks(local_ray, tmp_path):
    shard_dir = tmp_path / "in"
    paths = samples.make_sample_shards(str(shard_dir), shards=3, images_per_shard=6)
    out = tmp_path / "out"
    logs = tmp_path / "logs"
    logs.mkdir()
    pause = tmp_path / "pause"
    pause.touch()  # after 6 images the stage waits: at most 2 chunks are in flight, so 2 or 3 are committed
    stage = hold("slow", logs, 1, seconds=0.3, batch_size=1, pause_file=str(pause), pause_after=6)
    chunked = ["input.chunk_images=2", "input.readers=1"]
    args = ["--input", str(shard_dir), "--output", str(out), "--set", f"stages={json.dumps([stage])}",
            "--set", "ray.num_cpus=4", "--set", "ray.num_gpus=1", *[a for c in chunked for a in ("--set", c)]]
    with open(tmp_path / "driver.log", "wb") as log:
        driver = _annotate(args, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    store = OutputStore(str(out))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(store.committed()) < 2 and driver.poll() is None:
        time.sleep(0.1)
    ended = driver.poll()
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    pause.unlink()
    said = (tmp_path / "driver.log").read_text(errors="replace")[-3000:]
    assert ended is None, f"the driver ended (rc {ended}) before it was killed:\n{said}"
    before = {m["unit"]: m for m in store.markers()}
    assert 2 <= len(before) < 9, f"the kill should land mid-run:\n{said}"
    assert any(not m["end"]["last"] for m in before.values())  # a shard cut off between its chunks
    # Committed chunks must never be read again: their bytes become garbage in place; reading one would show.
    committed_bytes = 0
    for unit, marker in before.items():
        path = shard_dir / f"{unit.rsplit('-', 1)[0]}.tar"
        start, end = marker["end"]["offset"], marker["end"]["next_offset"]
        with open(path, "r+b") as f:
            f.seek(start)
            f.write(b"\xff" * (end - start))
        committed_bytes += end - start

    cfg, built = job([shard_dir], out, [stage], *chunked)
    summary = run_job(cfg, built)

    rows = output_rows(out)
    assert sorted((r["shard"], r["index"]) for r in rows) == [(f"sa_00000{s}", i) for s in range(3) for i in range(6)]
    assert all(r["status"] == "empty" and r["caption"] == "slow;" for r in rows)
    assert {m["unit"]: m for m in store.markers() if m["unit"] in before} == before
    assert summary["committed_now"] == 9 - len(before)
    assert 0 < summary["input_bytes_read"] <= sum(os.path.getsize(p) for p in paths) - committed_bytes
    assert "shards   3/3 done (9 chunks committed)" in status(str(out), config.S3Options())


def test_rerun_with_another_config_is_refused_unless_overwrite(local_ray, sample_shards, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    out = tmp_path / "out"
    cfg, built = job(sample_shards[:1], out, [hold("a", logs, 0.5)])
    run_job(cfg, built)
    changed = ["--input", str(sample_shards[0]), "--output", str(out), "--set", f"stages={json.dumps([hold('a', logs, 0.5, x=1)])}"]
    refused = _annotate(changed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2
    assert "different config" in err and "stages[0].params.x: None in the output, 1 now" in err and "--overwrite" in err


def test_chunks_of_one_shard_are_read_in_parallel_at_most_chunks_in_flight_at_once_each_image_once(local_ray, tmp_path):
    paths = samples.make_sample_shards(str(tmp_path / "in"), shards=2, images_per_shard=5)
    logs = tmp_path / "logs"
    logs.mkdir()
    cfg, built = job(paths, tmp_path / "out", [hold("a", logs, 0.5, seconds=0.05, batch_size=1)],
                     "input.chunk_images=1", "input.readers=3", "input.chunks_in_flight=2",
                     "output.committers=1")  # each commit waits for the one before
    summary = run_job(cfg, built)
    rows = output_rows(tmp_path / "out")
    assert sorted((r["shard"], r["index"]) for r in rows) == [(f"sa_00000{s}", i) for s in range(2) for i in range(5)]
    assert summary["committed_now"] == 10 and 1 <= summary["chunks_in_flight_peak"] <= 2  # 3 readers, 2 places
    assert summary["input_bytes_read"] <= sum(os.path.getsize(p) for p in paths)  # each chunk's own bytes, once


def test_a_shard_read_in_order_waits_at_chunks_in_flight_too(local_ray, tmp_path):
    """Compressed tars (as S3 shards) are read in order by one task each; once a chunk's rows have moved on as
    blocks its reader waits at the bound like any other (before, it read on past it while it held a chunk)."""
    paths = samples.make_sample_shards(str(tmp_path / "in"), shards=2, images_per_shard=8, compressed=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    cfg, built = job(paths, tmp_path / "out", [hold("a", logs, 0.5, seconds=0.05, batch_size=1)],
                     "input.chunk_images=2", "input.readers=2", "input.chunks_in_flight=3", "ray.block_bytes=1024")
    summary = run_job(cfg, built)
    rows = output_rows(tmp_path / "out")
    assert sorted((r["shard"], r["index"]) for r in rows) == [(f"sa_00000{s}", i) for s in range(2) for i in range(8)]
    assert summary["committed_now"] == 8 and 1 <= summary["chunks_in_flight_peak"] <= 3


def test_ray_datas_per_block_statistics_are_kept_to_the_last_blocks_of_each_operator(local_ray, sample_shards,
                                                                                     monkeypatch, tmp_path):
    import ray.data

    def blocks_described(callbacks):
        ctx = ray.data.DataContext.get_current()
        monkeypatch.setattr(ctx, "custom_execution_callback_classes", callbacks)
        ds = ray.data.range(60, override_num_blocks=60).map_batches(lambda batch: batch, batch_size=1)
        assert sum(len(batch["id"]) for batch in ds.iter_batches(batch_size=None)) == 60
        return [int(n) for n in re.findall(r"(\d+) blocks produced", ds.stats())]

    monkeypatch.setattr(dataset, "BLOCK_STATS_KEPT", 3)
    described = blocks_described([])
    assert described and all(n == 60 for n in described), described  # one per block (ray-project/ray#66016)
    kept = blocks_described([dataset.forget_old_block_stats()])
    assert kept and all(n <= 6 for n in kept), kept

    cfg, stages = job(sample_shards[:1], tmp_path / "out", [hold("a", tmp_path / "logs", 0.5)])
    for _ in range(2):
        dataset.build_dataset([shards.Segment(str(sample_shards[0]))], stages, cfg, gate=None)
    registered = ray.data.DataContext.get_current().custom_execution_callback_classes
    assert registered.count(dataset.forget_old_block_stats()) == 1


def test_the_chunks_whose_rows_may_still_be_in_their_reader():
    chunks = [["c0", 5000], ["c1", 1000], ["c2", 1500], ["c3", 0]]
    assert dataset.unsent_units(chunks, 1000) == ["c3", "c2", "c1"]  # c0 is followed by 2500 bytes >= 2 blocks
    assert dataset.unsent_units(chunks, 100) == ["c3", "c2"]
    assert dataset.unsent_units(chunks, None) == ["c3", "c2", "c1", "c0"]  # no block limit: all sent at the end
    assert dataset.unsent_units([], 100) == []


def test_the_chunk_gate_lets_readers_wait_holding_unsent_rows_only_within_its_spare_places():
    import asyncio

    async def scenario():
        gate = dataset.ChunkGate(limit=4, least=1)  # 3 places above the least safe bound

        async def settle():  # the loop runs what is ready, turn after turn: no clock involved
            for _ in range(50):
                await asyncio.sleep(0)

        async def take(unit, reader, unsent):
            task = asyncio.ensure_future(gate.take(unit, reader, unsent))
            await settle()
            return task

        for unit, reader, unsent in (("a0", "A", []), ("d0", "D", []), ("d1", "D", ["d0"]), ("b0", "B", [])):
            assert (await take(unit, reader, unsent)).done()  # places free: nobody waits
        a1 = await take("a1", "A", ["a0"])  # full: A waits holding one unsent chunk (1 of 3 spare)
        c0 = await take("c0", "C", [])  # a reader holding nothing always waits
        d2 = await take("d2", "D", ["d1", "d0"])  # D waits holding two (3 of 3)
        b1 = await take("b1", "B", ["b0"])  # one more would overfill the spare places: B reads on
        assert not (a1.done() or c0.done() or d2.done()) and b1.done()
        assert len(gate.held) == 5 and gate.unsent_waiting == 3
        for unit in ("a0", "b0", "b1"):
            await gate.release(unit)
        await settle()
        assert a1.done() and c0.done() and not d2.done()  # first come, first served, up to the limit
        assert sorted(gate.held) == ["a1", "c0", "d0", "d1"] and gate.unsent_waiting == 2
        d2.cancel()

    asyncio.run(scenario())


def test_progress_shows_an_eta_from_this_runs_shards_once_one_is_done():
    import io

    lines = io.StringIO()
    shown = progress.Progress(total=4, done=1, every=60, out=lines)  # one shard done before this run
    shown.unit({"unit": "sa_1-00000", "images": 2, "errors": 0}, shard_done=False)
    assert "shards 1/4" in lines.getvalue() and "ETA" not in lines.getvalue()  # no shard of this run done yet
    shown.start -= 10  # this run has taken 10 s when its first shard is done
    shown.unit({"unit": "sa_1-00001", "images": 2, "errors": 0}, shard_done=True)
    last = lines.getvalue().splitlines()[-1]
    assert "shards 2/4" in last and "ETA 0:00:2" in last  # 2 shards left at ~10 s each
