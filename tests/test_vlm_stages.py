"""Caption and refer as pipeline stages on a local Ray, served by one VLM engine pool (tiny InternVL)."""

import json

import pyarrow.dataset as pads
import pytest

from sculpt import config
from sculpt.engine.job import annotate as run_job

pytest.importorskip("vllm")


VLM_SETTINGS = ["vlm.max_tiles=2", "vlm.max_model_len=4096", "vlm.enforce_eager=true"]


@pytest.fixture(scope="class")
def engine_pool(local_ray, tiny_models):
    """One engine pool of the tiny InternVL for the tests of a class (an engine takes ~50 s to start on a CPU); the
    stages of each test's job find it by name, as a job's stages do."""
    from actors.vlm import vlm_engines

    cfg = config.load(None, [f"models.vlm={tiny_models['vlm']}", *VLM_SETTINGS])
    with vlm_engines(cfg, config.build_stages(cfg)) as engines:
        yield engines


@pytest.mark.usefixtures("engine_pool")
class TestOnOneEnginePool:
    """The real engine: caption and refer share it, the whole chain runs on it, and a killed engine core (last)."""

    def test_caption_and_refer_share_one_engine_pool(self, local_ray, engine_pool, tiny_models, sample_shards, tmp_path):
        stages = [
            {"name": "caption", "params": {"max_tokens": 32}},
            {"name": "objects", "class": "tests.doubles:ThresholdMasker", "cpus": 0.5},  # stands in for ground + mask
            {"name": "refer", "params": {"max_tokens": 12}},
        ]
        cfg = config.load(None, [f"input.shards=[{sample_shards[0]}]", f"output.path={tmp_path / 'out'}",
                                 f"stages={json.dumps(stages)}", f"models.vlm={tiny_models['vlm']}", *VLM_SETTINGS,
                                 "vlm.gpus=1"])
        built = config.build_stages(cfg)
        assert [s.resources.gpus for s in built] == [0, 0, 0]  # the engines hold the GPU, not the stage actors
        before = local_ray.get(engine_pool[0].prefix_cache.remote())
        summary = run_job(cfg, built)
        cache = local_ray.get(engine_pool[0].prefix_cache.remote())
        assert len(engine_pool) == 1

        rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
        assert summary["images"] == len(rows) == 4
        from sculpt.testing import kit

        assert [r["status"] for r in rows] == ["ok"] * 4  # the trained tiny model captions and refers every image
        for row in rows:
            assert row["caption"] == kit.CAPTION
            obj, negative = row["objects"]  # the masked object, and the negative the refer stage asked for
            assert obj["expression"] == kit.EXPRESSION and obj["error"] is None
            assert obj["expression_words"] == len(kit.EXPRESSION.split())
            assert (negative["category"], negative["expression"], negative["area"]) == ("negative", kit.NEGATIVE, 0)
        # every refer request found its image (and caption) already in the engine's prefix cache
        hits = cache["prefix_cache_hits"] - before["prefix_cache_hits"]  # this job's
        assert hits >= 256 * sum(r["status"] != "error" for r in rows)
        marker = json.loads((tmp_path / "out" / ".sculpt" / "markers" / "sa_000000-00000.json").read_text())
        assert marker["model_ids"] == {"caption": tiny_models["vlm"], "refer": tiny_models["vlm"]}

    def test_the_five_stage_chain_runs_end_to_end_on_tiny_models(self, local_ray, tiny_models, sample_shards, tmp_path):
        import numpy as np

        from sculpt.annotation import rle
        from sculpt.testing import kit

        overrides = [f"input.shards=[{sample_shards[1]}]", f"output.path={tmp_path / 'out'}", *VLM_SETTINGS,
                     "stages.caption.params.max_tokens=32",
                     "stages.ground.params.max_new_tokens=64", "stages.ground.params.num_beams=1",
                     "stages.refer.params.max_tokens=16", *(f"models.{k}={v}" for k, v in tiny_models.items())]
        cfg = config.load(None, overrides)
        stages = config.build_stages(cfg)
        assert [s.name for s in stages] == ["caption", "ground", "mask", "refer", "verify"]
        verify_params = stages[-1].params
        summary = run_job(cfg, stages)

        rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
        assert summary["images"] == len(rows) == 4
        # The trained tiny models carry objects through every stage: most images have objects with an IoU.
        assert sum(r["status"] == "ok" for r in rows) >= 3, [r["error"] for r in rows]
        objects = [obj for row in rows for obj in row["objects"]]
        assert len(objects) >= 3 * 4 and sum(obj["iou"] is not None for obj in objects) >= 0.75 * len(objects)
        for row in rows:
            assert row["status"] in ("ok", "error")
            if row["status"] == "error":
                assert row["error"].split(":")[0] in {"caption", "ground", "mask", "refer", "verify"}
            for obj in row["objects"]:
                assert obj["mask"]["size"] == [row["height"], row["width"]]
                assert obj["area"] == rle.decode(obj["mask"]).sum()
                assert obj["expression_words"] == len(obj["expression"].split()) >= 2
                if obj["category"] == "negative":
                    assert obj["area"] == 0 and obj["box"] is None and obj["iou"] is None
                    assert obj["kept"] == (obj["verifier_area"] <= verify_params["negative_area"] * row["width"] * row["height"])
                    continue
                assert obj["phrase"] == row["caption"][obj["phrase_start"]:obj["phrase_end"]]
                assert obj["category"] in {"stuff", "part", "single", "multi"}
                assert obj["kept"] == (obj["iou"] >= 0.5 and obj["iou"] - obj["rival_iou"] >= verify_params["margin"])
            linked = sorted(i for span in row["grounded_caption"] or [] for i in span["objects"])
            assert linked == [i for i, obj in enumerate(row["objects"]) if obj["category"] != "negative"]

        # every kind of pair: the tiny models ground "the wooden floor" (stuff), "its long tail" (a part), "two green
        # plants" to two boxes (a group) and name an absent yellow umbrella (a negative)
        groups = [(row, obj) for row in rows for obj in row["objects"] if obj["members"]]
        negatives = [obj for obj in objects if obj["category"] == "negative"]
        assert groups and negatives
        assert {obj["category"] for obj in objects} >= {"single", "multi", "negative", "stuff", "part"}
        for row, group in groups:
            members = [row["objects"][i] for i in group["members"]]
            assert len(members) >= 2 and all(m["phrase_start"] == group["phrase_start"] for m in members)
            union = np.any([rle.decode(m["mask"]) for m in members], axis=0)
            assert np.array_equal(rle.decode(group["mask"]), union) and group["expression"]
        assert {n["expression"] for n in negatives} == {kit.NEGATIVE}
        marker = json.loads((tmp_path / "out" / ".sculpt" / "markers" / "sa_000001-00000.json").read_text())
        assert set(marker["model_ids"]) == {"caption", "ground", "mask", "refer", "verify"}
        assert marker["model_ids"]["verify"] == tiny_models["verify"] and marker["prompts_version"]
        assert marker["filter"] == {"threshold": 0.5, "margin": 0.1, "negative_area": 0.01, "semantic": [], "prefix": ""}
        # every stage that saw an image timed it; the job's statistics are written and reported
        assert set(marker["stage_images"]) <= {"caption", "ground", "mask", "refer", "verify"}
        assert marker["stage_images"]["caption"] == sum(1 for r in rows if not (r["error"] or "").startswith("read"))
        job_stats = json.loads((tmp_path / "out" / ".sculpt" / "stats.json").read_text())
        assert job_stats["rows"] == 4 and "stage_images_per_second" in job_stats["derived"]
        from sculpt import cli

        assert cli.main(["report", str(tmp_path / "out")]) == 0
        assert sorted(p.name for p in (tmp_path / "out" / "_report").iterdir()) == [
            "expression_words.png", "index.html", "iou_histogram.png", "objects_per_image.png", "stage_throughput.png"]
        assert sum(job_stats["pairs_by_category"].values()) == sum(obj["verifier_area"] is not None for obj in objects)
        assert job_stats["pairs_by_category"]["negative"] == len(negatives) and job_stats["group_sizes"]

    @staticmethod
    def engine_cores(engine_pool, ray):
        """The machine's vLLM engine core processes (CI runs no other engines beside the pool's)."""
        import psutil

        return {p.pid for p in psutil.process_iter(["name"]) if "EngineCore" in (p.info["name"] or "")}

    def test_a_killed_engine_core_is_restarted_and_no_image_fails(self, local_ray, engine_pool, tiny_models, sample_shards,
                                                                  tmp_path):
        import dataclasses
        import os
        import signal

        out = tmp_path / "out"
        cfg = config.load(None, [f"input.shards={json.dumps(sample_shards)}", f"output.path={out}", "input.readers=1",
                                 "input.batch_images=2", f"models.vlm={tiny_models['vlm']}", *VLM_SETTINGS,
                                 'stages=[{"name": "caption", "actors": 1, "batch_size": 2, "params": {"max_tokens": 8}}]'])
        stages = config.build_stages(cfg)
        first = run_job(dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, shards=sample_shards[:1])), stages)
        killed = self.engine_cores(engine_pool, local_ray)
        for pid in killed:  # the engine's core process dies while its actor lives on
            os.kill(pid, signal.SIGKILL)
        summary = run_job(cfg, stages)  # its next requests find it dead
        after = self.engine_cores(engine_pool, local_ray)
        assert first["committed_now"] == 1 and len(killed) == 1
        assert after and not after & killed  # a new engine core served the rest
        rows = pads.dataset(str(out), format="parquet").to_table().to_pylist()
        assert summary["pending"] == {} and summary["committed_now"] == 2 and len(rows) == 12
        assert [r["status"] for r in rows] == ["empty"] * 12 and all(r["caption"] for r in rows)


class PlacementProbe:
    """Stands in for VLMEngine: reports where Ray put it and what it would have handed to vllm.LLM."""

    def __init__(self, model, engine_kwargs, max_tiles, min_tiles, max_in_flight):
        import ray

        group = ray.util.get_current_placement_group()
        self.seen = {"engine_kwargs": engine_kwargs, "gpu_ids": ray.get_gpu_ids(),
                     "bundles": group.bundle_specs if group else None}

    def ready(self):
        return True

    def where(self):
        return self.seen


@pytest.mark.parametrize("settings, expect", [
    (["vlm.replicas=2", "vlm.gpus=0.5"], {"bundles": None, "gpus": 1, "memory": 0.45}),
    (["vlm.tensor_parallel=2"], {"bundles": [{"CPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}], "gpus": 0, "memory": None}),
])
def test_engine_pool_placement(local_ray, settings, expect):
    from actors.vlm import vlm_engines

    cfg = config.load(None, ["models.vlm=stand-in/vlm", *settings])  # the stand-in engines load nothing
    stages = config.build_stages(cfg)
    with vlm_engines(cfg, stages, engine_class=PlacementProbe) as engines:
        seen = local_ray.get([engine.where.remote() for engine in engines])
        assert len(engines) == cfg.vlm.replicas
    for where in seen:
        assert where["bundles"] == expect["bundles"]
        assert len(where["gpu_ids"]) == expect["gpus"]  # a TP engine holds no GPU itself: its workers do
        assert where["engine_kwargs"].get("gpu_memory_utilization") == expect["memory"]
        assert where["engine_kwargs"]["enable_prefix_caching"] is True
        assert where["engine_kwargs"]["trust_remote_code"] is False  # the checkpoint's own code runs only when asked
    if expect["bundles"]:
        assert seen[0]["engine_kwargs"]["tensor_parallel_size"] == 2
        assert seen[0]["engine_kwargs"]["distributed_executor_backend"] == "ray"
    assert local_ray.util.placement_group_table() == {} or all(
        g["state"] == "REMOVED" for g in local_ray.util.placement_group_table().values())


class DiesOnPoison:
    """Stands in for VLMEngine: answers every request, except that a request saying "poison", or about an image
    listed in ``model``/poison, ends its process the way a dead engine core ends VLMEngine's. Each process it starts
    in leaves a ``pid-*`` file in ``model`` (when that is a directory)."""

    def __init__(self, model, engine_kwargs, max_tiles, min_tiles, max_in_flight):
        import os

        self.poison = set()
        if os.path.isdir(model):
            open(os.path.join(model, f"pid-{os.getpid()}"), "w").close()
            if os.path.exists(os.path.join(model, "poison")):
                self.poison = set(open(os.path.join(model, "poison")).read().split())

    def ready(self):
        return True

    def chat(self, encoded_images, requests, max_tokens):
        import os

        if any(text == "poison" or key in self.poison for key, text in requests):
            os._exit(1)
        return [{"text": f"answer to {text}", "finish_reason": "stop"} for _, text in requests]


def test_a_request_that_kills_the_engine_every_time_fails_instead_of_restarting_it_forever(local_ray):
    from actors.vlm import vlm_engines

    cfg = config.load(None, ["models.vlm=stand-in/vlm"])  # the stand-in engine loads nothing
    with vlm_engines(cfg, config.build_stages(cfg), engine_class=DiesOnPoison) as engines:
        with pytest.raises(local_ray.exceptions.RayActorError):
            local_ray.get(engines[0].chat.remote({}, [("sa_1", "poison")], 8), timeout=60)
        # the engine restarted each time the call was sent again, and serves the next call
        assert local_ray.get(engines[0].chat.remote({}, [("sa_1", "hello")], 8), timeout=60)[0]["text"] == "answer to hello"


def test_an_image_the_engine_dies_on_costs_only_its_own_calls_and_waits_for_the_next_run(local_ray, tmp_path):
    import os

    from actors.caption import Captioner
    from actors.vlm import vlm_engines
    from sculpt.testing import samples
    from sculpt import schema
    from sculpt.stage import StageActor

    (tmp_path / "poison").write_text("u/1")
    (tmp_path / "config.json").write_text("{}")  # a model directory, as the config check wants
    cfg = config.load(None, [f"models.vlm={tmp_path}"])
    picture = samples.jpeg_bytes(samples.photo("rocket")[:32, :32])
    rows = [schema.new_row("u", i, f"sa_{i}", image_bytes=picture) for i in range(3)]
    with vlm_engines(cfg, config.build_stages(cfg), engine_class=DiesOnPoison):
        out = StageActor(Captioner(), attempts=3, backoff_seconds=0.0)(schema.to_table(rows)).to_pylist()
    assert [bool(r["transient_error"]) for r in out] == [False, True, False]  # pending, for the next run
    assert "the VLM engine died on this call" in out[1]["transient_error"]
    assert out[0]["caption"] and out[2]["caption"] and out[1]["status"] != "error"
    # the batch's call and then the image's own, each sent to the engine 1 + faults.engine_call_retries times: no more
    starts = [name for name in os.listdir(tmp_path) if name.startswith("pid-")]
    assert len(starts) == 1 + 2 * (1 + cfg.faults.engine_call_retries)
