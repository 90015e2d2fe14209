"""The VLM engine on the tiny InternVL: real vLLM (CPU build), real photographs, one engine for the module."""

import numpy as np
import pytest
from PIL import Image

from sculpt.annotation import prompts
from sculpt.testing import samples
from sculpt.engine import vlm
from sculpt.testing.kit import CAPTION, EXPRESSION, GROUNDING
from tests.test_tiny_models import scene_prompts

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def tiny_vlm(tiny_models):
    return tiny_models["vlm"]


@pytest.fixture(scope="module")
def engine(tiny_vlm):
    from actors.vlm import VLMEngine

    engine = VLMEngine(tiny_vlm, {"max_model_len": 4096, "enforce_eager": True, "seed": 0,
                                  "enable_prefix_caching": True, "disable_log_stats": False}, max_tiles=2, min_tiles=1)
    yield engine
    engine.shutdown()


def test_an_engine_actor_that_ends_itself_takes_its_engine_core_along():
    """The engine core, a child process, outlives os._exit: left running, it would hold the GPU's memory."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    script = ("import subprocess; from actors.vlm import end_process; "
              "core = subprocess.Popen(['sleep', '600']); print(core.pid, flush=True); end_process()")
    ended = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    core = int(ended.stdout.split()[0])
    assert ended.returncode == 1, ended.stderr
    def gone() -> bool:  # dead, perhaps not yet reaped (an orphan's reaper is pid 1)
        try:
            return psutil.Process(core).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 30  # SIGKILL lands a moment after the parent's exit on a loaded machine
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone()


def test_engine_plan_places_fractions_and_tensor_parallel():
    half = vlm.engine_plan(0.5, 1, 1, {})
    assert half["actor"] == {"num_cpus": 1, "num_gpus": 0.5} and half["bundles"] is None
    assert half["engine"]["gpu_memory_utilization"] == 0.45 and half["engine"]["enable_prefix_caching"] is True
    assert "gpu_memory_utilization" not in vlm.engine_plan(1, 1, 1, {})["engine"]
    tp = vlm.engine_plan(1, 2, 4, {"max_model_len": 8192})
    assert tp["bundles"] == [{"CPU": 2}] + [{"GPU": 1.0}] * 4 and tp["actor"] == {"num_cpus": 2}
    assert tp["engine"]["tensor_parallel_size"] == 4 and tp["engine"]["distributed_executor_backend"] == "ray"
    with pytest.raises(ValueError, match="whole GPU"):
        vlm.engine_plan(0.5, 1, 2, {})


def test_replica_routing_is_stable():
    assert {vlm.replica_for("sa_000001/7", 3) for _ in range(5)} == {vlm.replica_for("sa_000001/7", 3)}
    assert {vlm.replica_for(f"s/{i}", 3) for i in range(50)} == {0, 1, 2}


def test_tiling_settings_reach_the_processor(tiny_vlm):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vlm)
    coffee = Image.fromarray(samples.photo("coffee"))  # 600 x 400
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                         add_generation_prompt=True)

    def tiles(max_tiles):
        kwargs = vlm.tiling_kwargs("internvl", max_tiles, 1)
        return len(processor(images=[coffee], text=[text], return_tensors="pt", **kwargs)["pixel_values"])

    assert tiles(1) == 1 and tiles(4) == 3  # 2 tiles + a thumbnail for a 3:2 image


def test_captions_real_photographs(engine):
    photos = {name: samples.jpeg_bytes(samples.photo(name)) for name in ("astronaut", "coffee")}
    answers = engine.chat(photos, [(name, prompts.CAPTION_PROMPT) for name in photos], max_tokens=12)
    assert len(answers) == 2
    for answer in answers:
        assert answer["finish_reason"] in ("length", "stop") and answer["text"]
    # square astronaut: one 256-token tile; 3:2 coffee: two tiles and a thumbnail
    assert answers[1]["prompt_tokens"] - answers[0]["prompt_tokens"] == 2 * 256


def test_the_engine_names_its_one_core_process(engine):
    import os

    import psutil

    (core,) = engine.core_pids()
    assert psutil.Process(core).ppid() == os.getpid()  # this process's child, no other engine's


def test_requests_about_one_image_share_the_image_prefix(engine):
    chelsea = {"chelsea": samples.jpeg_bytes(samples.photo("chelsea"))}
    texts = [prompts.refer_prompt("A cat.", phrase, box, 451, 300)
             for phrase, box in (("the cat", (0, 0, 200, 150)), ("the floor", (0, 200, 451, 300)))]
    first, second = (engine.chat(chelsea, [("chelsea", text)], max_tokens=2)[0] for text in texts)
    assert second["cached_tokens"] >= 256  # the image tile came from the engine's prefix cache


def test_requests_name_their_image_so_that_vllm_hashes_no_pixels(engine, monkeypatch):
    from vllm.multimodal.hasher import MultiModalHasher

    hashed, hash_kwargs = [], MultiModalHasher.hash_kwargs.__func__

    def recording(cls, algorithm, /, **kwargs):
        hashed.append(type(kwargs.get("image")).__name__)
        return hash_kwargs(cls, algorithm, **kwargs)

    monkeypatch.setattr(MultiModalHasher, "hash_kwargs", classmethod(recording))
    coffee = {"s/1": samples.jpeg_bytes(samples.photo("coffee"))}
    (answer,) = engine.chat(coffee, [("s/1", prompts.CAPTION_PROMPT)], max_tokens=2)
    assert answer["text"] and set(hashed) <= {"str"}  # the image's key (image_key), if anything: not its pixels


def test_concurrent_callers_reach_the_engine_together(engine):
    """Eight callers with two requests each, two callers per image: the engine holds more requests at once than
    any caller sends, and its image caches never drift (each image reaches the engine core before a request that
    names it as cached; rendered in the callers' threads, they overtook each other and vLLM asserted)."""
    import threading

    photos = {name: samples.jpeg_bytes(samples.photo(name)) for name in ("astronaut", "coffee", "chelsea", "rocket")}
    answers, start = [], threading.Barrier(8)
    before, drifted_before = engine.load()["served"], engine.load()["retryable_errors"]

    def caller(i):
        name = list(photos)[i % len(photos)]
        text = prompts.refer_prompt("A cat.", "the cat", (0, 0, 100, 100), 451, 300)
        start.wait()
        answers.extend(engine.chat({name: photos[name]}, [(name, text), (name, prompts.CAPTION_PROMPT)], max_tokens=8))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load = engine.load()
    assert len(answers) == 16 and all(a["text"] for a in answers)
    assert load["served"] - before == 16 and load["in_flight"] == 0
    assert load["peak_in_flight"] > 2  # more than one caller's requests were in the engine at once
    assert load["retryable_errors"] == drifted_before


def test_requests_vllm_answers_with_its_retryable_error_are_rendered_and_sent_again(engine, monkeypatch):
    """vLLM's answer to frontend/engine image-cache drift (seen in CI): finish_reason "error", resend with data."""
    from actors import vlm as vlm_actor

    real, sent = engine.loop.generate, []

    def drifting(prompts_, params):  # the engine's first answer comes back as vLLM's retryable error
        answers = real(prompts_, params)
        sent.append(len(prompts_))
        if len(sent) == 1:
            answers[0] = {**answers[0], "text": "", "finish_reason": "error"}
        return answers

    monkeypatch.setattr(engine.loop, "generate", drifting)
    chelsea = {"chelsea": samples.jpeg_bytes(samples.photo("chelsea"))}
    answers = engine.chat(chelsea, [("chelsea", prompts.CAPTION_PROMPT)] * 2, max_tokens=4)
    assert sent == [2, 1]  # only the errored request went again
    assert [a["finish_reason"] for a in answers] == ["length"] * 2 and answers[0]["text"] == answers[1]["text"] != ""

    monkeypatch.setattr(engine.loop, "generate", lambda prompts_, params: [
        {"text": "", "finish_reason": "error", "prompt_tokens": 0, "cached_tokens": 0} for _ in prompts_])
    with pytest.raises(vlm_actor.errors.TransientError, match="retryable error"):
        engine.chat(chelsea, [("chelsea", prompts.CAPTION_PROMPT)], max_tokens=4)


def test_prefix_cache_counters(engine):
    stats = engine.prefix_cache()
    assert stats["prefix_cache_queries"] > 0 and stats["prefix_cache_hits"] >= 256


def test_thin_images_are_captioned_whatever_their_aspect(engine):
    from sculpt.testing import kit

    photo = samples.photo("chelsea")
    thin = {f"{h}x{w}": samples.jpeg_bytes(np.ascontiguousarray(photo[:h, :w])) for h, w in
            [(1, 60), (3, 60), (60, 1), (60, 3), (1, 1), (3, 3)]}
    answers = engine.chat(thin, [(key, prompts.CAPTION_PROMPT) for key in thin], max_tokens=32)
    assert [a["text"] for a in answers] == [kit.CAPTION] * len(thin)


def test_tiny_internvl_captions_refers_and_negates_under_vllm(engine, tiny_models):
    """The trained tiny InternVL acts out the kit's scene through real vLLM with dynamic tiling (tests/test_tiny_models.py:
    the same through transformers' generate)."""
    import json
    import os

    from safetensors import safe_open

    directory = tiny_models["vlm"]
    # Stored in the dtype vLLM's "auto" picks from the config, so the engine loads the weights without a cast.
    with open(os.path.join(directory, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}

    photos = {name: samples.jpeg_bytes(samples.photo(name)) for name in samples.PHOTOS}
    sizes = {name: samples.photo(name).shape[1::-1] for name in samples.PHOTOS}
    requests = [(name, prompts.CAPTION_PROMPT) for name in photos]
    for (name, (width, height)), phrase in zip(sizes.items(), list(GROUNDING) * 2):
        requests.append((name, prompts.refer_prompt(CAPTION, phrase, (width * 0.1, height * 0.2, width * 0.6,
                                                                         height * 0.9), width, height)))
    requests.append(("chelsea", prompts.refer_prompt("A cat.", "the cat", (0, 0, 200, 150), 451, 300)))
    # the group and negative prompts as the refer stage asks them, in the 24 tokens it gives one negative
    scene = [(name, text, expected, clean)
             for name, size in sizes.items() for text, expected, clean in scene_prompts(*size)[2:]]
    more = engine.chat(photos, [(name, text) for name, text, _, _ in scene], max_tokens=24)
    answers = engine.chat(photos, requests, max_tokens=48)

    for (name, text, expected, clean), answer in zip(scene, more):
        assert answer["finish_reason"] == "stop", (name, text[:40], answer)
        assert answer["text"] == clean(answer["text"]) == expected, (name, text[:40], answer)
    captions, expressions = answers[:len(photos)], answers[len(photos):]
    for answer in captions:
        assert answer["finish_reason"] == "stop" and prompts.clean_caption(answer["text"]) == CAPTION, answer
    # coffee (3:2) and chelsea (3:2) take two tiles and a thumbnail; the square photos one tile
    assert captions[1]["prompt_tokens"] - captions[0]["prompt_tokens"] == 2 * 256
    for answer in expressions:
        assert answer["finish_reason"] == "stop", answer
        expression = prompts.clean_expression(answer["text"])
        assert expression == EXPRESSION and len(expression.split()) >= prompts.MIN_EXPRESSION_WORDS


def test_vllm_and_torch_say_nothing_of_triton_on_the_cpu_set_up():
    """The demo's terminal. The CPU set-up (Makefile) leaves out triton, which has no CPU backend here: vLLM would
    disable it and say so as it imports, before its logging is configured (VLLM_LOGGING_LEVEL cannot hold it back),
    in each of an engine's three processes. Without triton, torch warns of it as vLLM registers its custom ops;
    .ci/cpu_shims.py quiets that one logger."""
    import os
    import subprocess
    import sys

    for code in ["import vllm.triton_utils",
                 "import torch._library.triton as t; print(t.get_inner_triton_kernels(lambda: None))"]:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Triton" not in done.stdout + done.stderr, done.stderr[-3000:]
