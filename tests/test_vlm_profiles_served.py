"""The five-stage chain with tiny Qwen2.5-VL and Qwen3-VL checkpoints served by real vLLM (issue 29, VLM profiles):
each family is asked in its own box convention and its answers are read back in image pixels.

One engine start per family for the whole suite (``family_pool``, module-scoped); one shard of two 600 x 400
images (non-square, and larger than the tiny processors' pixel limit) per family. The InternVL run is
tests/test_vlm_stages.py's."""

import json

import pyarrow.dataset as pads
import pytest

from sculpt import config
from sculpt.engine.job import annotate as run_job

pytest.importorskip("vllm")

# Qwen2-VL (tiny_qwen_vl.write(..., "qwen2_vl")) is served the same way; left out of the suite for its time (an
# engine start, ~40 s on 2 cores): its convention is tests/test_profiles.py's
FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
VLM_SETTINGS = ["vlm.max_model_len=4096", "vlm.enforce_eager=true"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_pool(request, local_ray, tmp_path_factory):
    """(family, checkpoint directory) of a tiny checkpoint of the family, written and trained here (~10 s), with
    one engine pool serving it for the module's tests (their jobs' stages find it by name)."""
    from actors.vlm import vlm_engines
    from sculpt.testing import tiny_qwen_vl

    family = request.param
    model = tiny_qwen_vl.write(str(tmp_path_factory.mktemp(family)), family)
    cfg = config.load(None, [f"models.vlm={model}", *VLM_SETTINGS])
    with vlm_engines(cfg, config.build_stages(cfg)):
        yield family, model


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    """One SA-1B-format shard of two 600 x 400 photographs (tiny_qwen_vl.ANSWER_IMAGE_SIZE)."""
    from PIL import Image

    from sculpt.testing import samples, tiny_qwen_vl
    import numpy as np

    shard = str(tmp_path_factory.mktemp("two") / "sa_000000.tar")
    members = []
    for index, name in enumerate(("coffee", "chelsea")):
        image = np.asarray(Image.fromarray(samples.photo(name)).resize(tiny_qwen_vl.ANSWER_IMAGE_SIZE))
        members += [(f"sa_{index}.jpg", samples.jpeg_bytes(image)), (f"sa_{index}.json", samples.sa1b_json(index, image))]
    samples.write_tar(shard, members)
    return shard


def test_the_five_stage_chain_speaks_each_family_convention(local_ray, family_pool, two_images, tiny_models, tmp_path):
    from sculpt.annotation import profiles, verify
    from sculpt.testing import kit, tiny_qwen_vl

    family, model = family_pool
    profile = profiles.PROFILES[family]
    models = {**tiny_models, "vlm": model}
    # the VLM's stages and the ones they need (the instances stage asks no VLM: tests/test_vlm_stages.py runs it)
    stages = [{"name": name} for name in ("caption", "ground", "mask", "refer", "listen", "verify")]
    cfg = config.load(None, [f"input.shards=[{two_images}]", f"output.path={tmp_path / 'out'}", *VLM_SETTINGS,
                             f"stages={json.dumps(stages)}",  # 8 CPUs in all: the engine, one reader, 6 stages
                             "stages.caption.params.max_tokens=32", "stages.ground.params.max_new_tokens=64",
                             "stages.ground.params.num_beams=1", "stages.refer.params.max_tokens=16",
                             "stages.listen.params.max_tokens=24", "input.readers=1",
                             *(f"models.{k}={v}" for k, v in models.items())])
    stages = config.build_stages(cfg)
    verify_params = stages[-1].params
    summary = run_job(cfg, stages)

    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    assert summary["images"] == len(rows) == 2
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["error"] for r in rows]
    disagreed = []
    for row in rows:
        width, height = row["width"], row["height"]
        assert (width, height) == tiny_qwen_vl.ANSWER_IMAGE_SIZE and row["caption"] == kit.CAPTION
        # the listener's answer, read back in image pixels through the family's convention, is the cat's box
        size = None if profile.relative else tiny_qwen_vl.input_size(family, width, height)
        [heard] = profile.text_to_boxes(tiny_qwen_vl.listener_answer(family), width, height, size)
        unit = (width / 1000, height / 1000) if profile.relative else (width / size[0], height / size[1])
        cat = [v / 1000 * side for v, side in zip(kit.LISTENER_BOX, (width, height, width, height))]
        assert all(abs(a - b) <= u for a, b, u in zip(heard, cat, unit * 2)), (heard, cat)
        objects = row["objects"]
        assert {o["expression"] for o in objects if o["members"]} == {kit.GROUP_EXPRESSION}
        assert {o["expression"] for o in objects if o["category"] == "negative"} == {kit.NEGATIVE}
        assert kit.EXPRESSION in {o["expression"] for o in objects if o["category"] == "single"}
        for i, obj in enumerate(objects):
            if not verify.listened(objects, i):
                assert obj["listener_iou"] is None or obj["error"], obj
                continue
            assert obj["listener_iou"] == pytest.approx(verify.listener_iou([heard], obj["box"]), abs=1e-6)
            if obj["reject_reason"] == "listener":
                disagreed.append(obj)
    # the group of the two plants, far from the cat, is rejected by the listener (as with InternVL)
    assert any(o["category"] == "multi" and o["listener_iou"] == 0.0 for o in disagreed), disagreed
    marker = json.loads((tmp_path / "out" / ".sculpt" / "markers" / "sa_000000-00000.json").read_text())
    assert marker["vlm_profile"] == profile.label and marker["model_ids"]["refer"] == model
    job = json.loads((tmp_path / "out" / ".sculpt" / "job.json").read_text())
    assert job["vlm_profile"] == job["settings"]["vlm"]["profile"] == profile.label
