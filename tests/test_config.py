import json

import pytest

from sculpt import config
from sculpt.stage import Resources, Stage, StageActor, ray_options
from sculpt import schema


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "input: {shards: [s3://b/sa1b/], readers: 3}\n"
        "stages:\n"
        "  - {name: hold, class: 'tests.doubles:HoldGpu', gpus: 0.5, params: {seconds_per_image: 0.1}}\n"
    )
    cfg = config.load(str(path), ["stages.hold.actors=4", "stages.0.params.seconds_per_image=0.2", "output.path=s3://b/out"])
    assert cfg.input.readers == 3 and cfg.input.shards == ["s3://b/sa1b/"]
    assert cfg.stages[0].cls == "tests.doubles:HoldGpu" and cfg.stages[0].actors == 4
    assert cfg.stages[0].params == {"seconds_per_image": 0.2}
    stage = config.build_stage(cfg.stages[0])
    assert stage.resources == Resources(cpus=1.0, gpus=0.5, actors=4) and stage.name == "hold"


def test_unknown_keys_and_stages_are_named_in_the_error():
    with pytest.raises(config.ConfigError, match=r"input: unknown key\(s\) \['reader'\]"):
        config.load(None, ["input.reader=3"])
    with pytest.raises(config.ConfigError, match="not a built-in stage"):
        config.build_stage(config.StageConfig(name="nope"))
    with pytest.raises(config.ConfigError, match="cannot import"):
        config.build_stage(config.StageConfig(name="x", cls="tests.doubles:Missing"))


def test_example_config_loads_and_builds_the_chain():
    from sculpt.engine.cluster import resource_demand

    cfg = config.load("workflows/annotate.yaml")
    stages = config.build_stages(cfg)
    assert [s.name for s in stages] == ["caption", "ground", "mask", "refer", "verify"]
    assert stages[1].model_id == cfg.models.ground == "florence-community/Florence-2-large"
    assert resource_demand(cfg, stages)["GPU"] == 8 + 8 * 0.25 * 2 + 8 * 0.5  # two 8-GPU nodes


def test_default_chain_and_overrides_by_stage_name():
    cfg = config.load(None, ["stages.mask.gpus=0.5", "models.mask=/ckpt/sam2"])
    assert [s.name for s in cfg.stages] == list(config.BUILTIN_STAGES)
    mask = config.build_stages(cfg)[2]
    assert mask.resources.gpus == 0.5 and mask.model_id == "/ckpt/sam2" and mask.params["masks_at_once"] == 8
    assert config.build_stages(cfg)[1].resources.gpus == 0.25  # the built-in default of ground


def test_ray_options_from_resources():
    options = ray_options(Resources(cpus=2, gpus=0.25, memory_gb=1, actors=3))
    assert options["num_cpus"] == 2 and options["num_gpus"] == 0.25 and options["memory"] == 1 << 30
    assert options["compute"].min_size == options["compute"].max_size == 3
    assert "num_gpus" not in ray_options(Resources())
    with pytest.raises(ValueError):
        Resources(gpus=1.5)


class Flaky(Stage):
    name = "flaky"

    def process(self, rows):
        for row in rows:
            if row["image_key"] == "bad":
                raise RuntimeError("cannot")
            row["caption"] = "seen"


def test_stage_failure_marks_only_the_failing_image():
    rows = [schema.new_row("u", i, key) for i, key in enumerate(["a", "bad", "c"])]
    schema.mark_error(rows[2], "read", "corrupt")
    out = StageActor(Flaky())(schema.to_table(rows)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "error", "error"]
    assert out[0]["caption"] == "seen" and out[1]["error"] == "flaky: RuntimeError: cannot"
    assert out[2]["error"] == "read: corrupt" and out[2]["caption"] is None  # earlier errors are not reprocessed


class AddsThenFaults(Stage):
    """Adds an object to each row in turn; the first call runs out of device memory after the first row."""

    name = "adds"
    calls = 0

    def process(self, rows):
        import torch

        type(self).calls += 1
        for k, row in enumerate(rows):
            row["objects"] = (row["objects"] or []) + [schema.new_object(phrase="thing")]
            if k == 0 and type(self).calls == 1:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")


def test_a_try_that_fails_part_way_leaves_nothing_for_the_retry_to_repeat():
    rows = [schema.new_row("u", i, key) for i, key in enumerate(["a", "b"])]
    out = StageActor(AddsThenFaults(), attempts=2, backoff_seconds=0.0)(schema.to_table(rows)).to_pylist()
    assert AddsThenFaults.calls == 2
    assert [r["status"] for r in out] == ["ok", "ok"]
    assert [[o["phrase"] for o in r["objects"]] for r in out] == [["thing"], ["thing"]]


class BreaksDevice(Stage):
    name = "breaks"
    calls = 0

    def process(self, rows):
        type(self).calls += 1
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_fault_that_breaks_the_device_is_not_retried_in_the_process():
    rows = [schema.new_row("u", i, key) for i, key in enumerate(["a", "b"])]
    out = StageActor(BreaksDevice(), attempts=3, backoff_seconds=0.0)(schema.to_table(rows)).to_pylist()
    assert BreaksDevice.calls == 3  # the batch once, each image once: no retries in a process whose device is lost
    assert [r["status"] for r in out] == ["ok", "ok"]  # not errors: pending (in a job, the actor restarts instead)
    assert all(r["transient_error"].startswith("breaks: RuntimeError: CUDA error: an illegal memory access") for r in out)


def test_of_two_batches_meeting_a_broken_device_only_the_first_is_noted(monkeypatch):
    import threading
    import time

    import ray

    import sculpt.stage

    notes, exits = [], []

    class Faults:  # stands in for the job's DeviceFaults actor
        class note:
            @staticmethod
            def remote(batch):
                notes.append(batch)

        class counts_now:
            @staticmethod
            def remote():
                return {}

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setattr(sculpt.stage.os, "_exit", lambda code: exits.append(code) or time.sleep(3600))  # never returns
    actor = StageActor(BreaksDevice(), device_faults=Faults())
    fault = RuntimeError("CUDA error: an illegal memory access was encountered")
    threads = [threading.Thread(target=actor._restart_unless_outside_a_job, args=(batch, fault), daemon=True)
               for batch in ("faulty", "beside it")]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    assert notes == ["faulty"] and exits == [1]  # the second waits for the process to end, unblamed
    assert all(thread.is_alive() for thread in threads)


@pytest.mark.parametrize("override, message", [
    ("input.readers=-1", "input: readers=-1: must be an integer >= 1"),
    ("input.readers=two", "input: readers='two': must be an integer >= 1"),
    ("stages.ground.batch_size=0", "stages[1]: batch_size=0: must be an integer >= 1"),
    ("stages.mask.gpus=-0.5", "stages[2]: gpus=-0.5: must be a number >= 0"),
    ("vlm.replicas=0", "vlm: replicas=0: must be an integer >= 1"),
    ("input.chunks_in_flight=31", "config: input.chunks_in_flight=31: the stages' batches can hold back 31 chunks' last rows; "
                                  "set it to at least 32"),
    ("faults.max_error_share=1.5", "faults: max_error_share=1.5: a share, between 0 and 1"),
    ("s3.endpoint=minio.internal:9000", "s3: endpoint='minio.internal:9000' has no scheme: write http://minio.internal:9000"),
])
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(config.ConfigError) as caught:
        config.load(None, [override])
    assert str(caught.value).startswith(message)


def test_trust_remote_code_is_off_unless_asked():
    assert config.load(None, []).vlm.trust_remote_code is False
    assert config.load(None, ["vlm.trust_remote_code=true"]).vlm.trust_remote_code is True


def test_chunks_in_flight_defaults_to_the_least_safe_bound_and_one_per_reader_or_two_per_reader():
    assert config.load(None, []).least_chunks_in_flight == 32  # 1 + sum of (batch_size - 1) over the default chain
    assert config.load(None, []).chunk_limit == 34  # and one per reader (2)
    assert config.load(None, ["input.readers=40"]).chunk_limit == 80
    one_stage = json.dumps([{"name": "hold", "class": "tests.doubles:HoldGpu", "batch_size": 1}])
    assert config.load(None, [f"stages={one_stage}", "input.readers=3"]).chunk_limit == 6
    assert config.load(None, ["input.chunks_in_flight=50"]).chunk_limit == 50
