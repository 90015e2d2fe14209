"""Ray Serve LLM (``ray.serve.llm``) as the VLM pool: the figures of ``benchmarks/vlm_concurrency.py`` through a
Serve ``LLMServer`` deployment, prefix-cache affinity over two replicas, and what a killed engine process costs.

The same tiny InternVL (untrained: every request generates ``--max-tokens`` tokens) on vllm-cpu, the same
callers (eight Ray tasks, each sending ``--calls`` calls of ``--requests`` refer prompts about its own image, a
call's requests sent at once and awaited together), here through a ``DeploymentHandle`` to an ``LLMServer``
(``build_llm_deployment``), one OpenAI chat request per prompt, the image as a data URL first in each.
The replica class is ``LLMServer`` with a counter around ``chat`` (requests in the replica at once, the images
it served) and a way to read its engine-core process id; prefix-cache hits are each answer's
``usage.prompt_tokens_details.cached_tokens`` (vLLM's ``enable_prompt_tokens_details``).

1. concurrency: sculpt's own engine actor, then one replica with ``max_ongoing_requests`` = ``--requests``
   (one call's requests at a time, as the first wave's ``LLM.chat``) and = 256 (the pool's ``vlm.max_in_flight``):
   requests/s and the peak of requests in the engine / replica.
2. affinity: two replicas with ``PrefixCacheAffinityRouter`` and with Serve's default router: the replicas each
   image's requests went to, and the share of prompt tokens served from vLLM's prefix cache.
3. engine death: one replica under load, its vLLM engine-core process SIGKILLed: what the callers get, and how
   long until requests are answered again.

Before anything is timed, the callers' worker processes are started (``warm_callers``); ``--parts 0`` runs
sculpt's engine actor alone (``--pool-cpus``: its ``num_cpus``). Results: docs/BENCHMARKS.md, "Ray's own
mechanisms".

Ray 2.60's Serve needs ``grpcio-reflection`` and ``mmh3`` that this venv lacks (``ray[serve]``); they are put
on the path from ``--overlay`` (``pip install --no-deps --target DIR grpcio-reflection mmh3 jsonref``) rather
than into the project's venv.

    VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python benchmarks/serve_llm_pool.py --overlay /tmp/serve-overlay [--parts 1,2,3]
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_ID = "tiny-internvl"


def server_class():
    """LLMServer, counting the requests inside it; defined here so that it travels to the replicas by value."""
    from ray.serve.llm import LLMServer

    class CountedLLMServer(LLMServer):
        async def chat(self, request, raw_request_info=None):
            stream = await super().chat(request, raw_request_info)
            return self._counted(stream, _image_of(request))

        async def _counted(self, stream, image):
            if not hasattr(self, "bench"):
                self.bench = {"in_flight": 0, "peak": 0, "served": 0, "images": Counter()}
            b = self.bench
            b["in_flight"] += 1
            b["peak"] = max(b["peak"], b["in_flight"])
            b["images"][image] += 1
            try:
                async for item in stream:
                    yield item
            finally:
                b["in_flight"] -= 1
                b["served"] += 1

        async def bench_load(self) -> dict:
            import psutil

            b = getattr(self, "bench", {"in_flight": 0, "peak": 0, "served": 0, "images": Counter()})
            cores = [p.pid for p in psutil.Process().children(recursive=True)
                     if "EngineCor" in p.name() or "EngineCore" in " ".join(p.cmdline())]
            return {"pid": os.getpid(), "peak": b["peak"], "served": b["served"], "images": dict(b["images"]),
                    "engine_cores": cores}

        async def bench_reset(self) -> None:
            self.bench = {"in_flight": 0, "peak": 0, "served": 0, "images": Counter()}

    return CountedLLMServer


def _image_of(request) -> str:
    import zlib

    for message in request.messages:
        for part in message.get("content", []) if isinstance(message, dict) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                return f"{zlib.crc32(part['image_url']['url'].encode()):08x}"
    return "?"


def deploy(model: str, replicas: int, max_ongoing: int, router: str | None, overlay: str):
    from ray import serve
    from ray.serve.llm import LLMConfig, build_llm_deployment

    from sculpt.engine import vlm

    deployment_config = {"num_replicas": replicas, "max_ongoing_requests": max_ongoing,
                         "health_check_period_s": 2, "health_check_timeout_s": 10}
    if router:
        deployment_config["request_router_config"] = {"request_router_class": router}
    config = LLMConfig(
        model_loading_config={"model_id": MODEL_ID, "model_source": model},
        engine_kwargs={"max_model_len": 4096, "enforce_eager": True, "seed": 0, "enable_prefix_caching": True,
                       "disable_log_stats": False, "limit_mm_per_prompt": {"image": 1},
                       "enable_prompt_tokens_details": True,  # usage.prompt_tokens_details.cached_tokens
                       "mm_processor_kwargs": vlm.tiling_kwargs("internvl", 1, 1)},
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config=deployment_config,
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                                  "PYTHONPATH": os.pathsep.join([ROOT, overlay])}},
    )
    app = build_llm_deployment(config, deployment_cls=server_class())
    return serve.run(app, name="vlm", route_prefix=None)


def replicas_load(handle, replicas: int) -> list[dict]:
    """Ask until every replica has answered (the router picks one per call)."""
    seen: dict[int, dict] = {}
    for _ in range(50 * replicas):
        load = handle.bench_load.remote().result()
        seen[load["pid"]] = load
        if len(seen) >= replicas:
            break
    return list(seen.values())


def reset(handle, replicas: int) -> None:
    for _ in range(20 * replicas):
        handle.bench_reset.remote().result()


def request(photo: bytes, text: str, max_tokens: int):
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    url = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
    return ChatCompletionRequest(model=MODEL_ID, max_tokens=max_tokens, temperature=0.0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": text}]}])


def refer_texts(n: int) -> list[str]:
    from sculpt.annotation import prompts

    return [prompts.refer_prompt("A cat.", f"object {j}", (j, j, 100 + j, 100 + j), 451, 300) for j in range(n)]


def answer(response_gen):
    """The chat answer a handle's stream ends with."""
    last = None
    for item in response_gen:
        last = item
    if last is None or not hasattr(last, "choices"):
        raise RuntimeError(f"no chat answer: {str(last)[:300]}")
    return last


def callers_run(handle, photos: list[bytes], requests: int, calls: int, max_tokens: int) -> tuple[int, float]:
    import ray

    @ray.remote(num_cpus=0)
    def caller(i: int, handle) -> int:
        texts = refer_texts(requests)
        done = []
        for _ in range(calls):
            sent = [handle.options(stream=True).chat.remote(request(photos[i], t, max_tokens)) for t in texts]
            done += [answer(gen) for gen in sent]
        return [{"tokens": a.usage.completion_tokens, "chars": len(a.choices[0].message.content),
                 "prompt": a.usage.prompt_tokens,
                 "cached": (a.usage.prompt_tokens_details.cached_tokens or 0) if a.usage.prompt_tokens_details else 0}
                for a in done]

    started = time.perf_counter()
    answers = [a for got in ray.get([caller.remote(i, handle) for i in range(len(photos))]) for a in got]
    seconds = time.perf_counter() - started
    return len(answers), seconds, {key: sum(a[key] for a in answers) for key in answers[0]}


def warm_callers(n: int) -> None:
    """Start the callers' worker processes and their imports before anything is timed (the first run paid them)."""
    import ray

    @ray.remote(num_cpus=0)
    def warm() -> None:
        import importlib

        for module in ("ray.serve.llm.openai_api_models", "sculpt.annotation.prompts", "PIL.Image"):
            importlib.import_module(module)
        time.sleep(1)

    ray.get([warm.remote() for _ in range(n)])


def pool_run(model, photos, args) -> float:
    """The same callers against sculpt's engine actor (``actors.vlm.VLMEngine``), one call = one image's requests."""
    import ray

    from actors.vlm import VLMEngine

    engine = ray.remote(VLMEngine).options(max_concurrency=256, num_cpus=args.pool_cpus).remote(
        model, {"max_model_len": 4096, "enforce_eager": True, "seed": 0, "enable_prefix_caching": True,
                "disable_log_stats": False}, 1, 1, 256)
    ray.get(engine.ready.remote())
    requests = args.requests

    @ray.remote(num_cpus=0)
    def caller(i: int) -> int:
        texts = refer_texts(requests)
        return [(len(a["text"]), a["prompt_tokens"], a["cached_tokens"]) for _ in range(args.calls)
                for a in ray.get(engine.chat.remote({f"image-{i}": photos[i]}, [(f"image-{i}", t) for t in texts],
                                                    args.max_tokens))]

    ray.get(engine.chat.remote({"warm": photos[0]}, [("warm", "Describe the image.")], args.max_tokens))
    started = time.perf_counter()
    got = [a for answers in ray.get([caller.remote(i) for i in range(len(photos))]) for a in answers]
    seconds, answered = time.perf_counter() - started, len(got)
    chars, prompt, cached = (sum(a[k] for a in got) for k in range(3))
    load = ray.get(engine.load.remote())
    ray.kill(engine)
    print(f"{f'sculpt pool ({args.pool_cpus} CPU)':28s} {answered} requests in {seconds:.2f} s = "
          f"{answered / seconds:.1f} req/s, "
          f"peak in the engine {load['peak_in_flight']}; {chars / answered:.0f} characters per answer; "
          f"prompt tokens from the prefix cache {cached / prompt:.0%}", flush=True)
    return answered / seconds


def part_concurrency(model, photos, args):
    from ray import serve

    results = {"pool": pool_run(model, photos, args)}
    for ongoing in (args.requests, 256):
        handle = deploy(model, 1, ongoing, None, args.overlay)
        answer(handle.options(stream=True).chat.remote(request(photos[0], "Describe the image.", args.max_tokens)))
        reset(handle, 1)
        answered, seconds, sums = callers_run(handle, photos, args.requests, args.calls, args.max_tokens)
        load = replicas_load(handle, 1)[0]
        results[ongoing] = answered / seconds
        print(f"{f'Serve, max_ongoing_requests={ongoing}':28s} {answered} requests in {seconds:.2f} s = "
              f"{answered / seconds:.1f} req/s, peak in the replica {load['peak']}; {sums['tokens'] / answered:.1f} "
              f"tokens, {sums['chars'] / answered:.0f} characters per answer; prompt tokens from the prefix cache "
              f"{sums['cached'] / sums['prompt']:.0%}", flush=True)
        serve.delete("vlm")
    results["pool"] = (results["pool"] + pool_run(model, photos, args)) / 2  # before and after: the host's load drifts
    print(f"Serve 256 / Serve {args.requests} (one call's requests at a time): "
          f"{results[256] / results[args.requests]:.2f}x; "
          f"Serve 256 / sculpt pool (mean of its two runs): {results[256] / results['pool']:.2f}x; "
          f"callers offered {len(photos) * args.requests} requests at once", flush=True)


def part_affinity(model, photos, args):
    from ray import serve

    for label, router in (("PrefixCacheAffinityRouter", "ray.serve.llm.request_router:PrefixCacheAffinityRouter"),
                          ("default (power of two)", None)):
        handle = deploy(model, 2, 256, router, args.overlay)
        answered, seconds, sums = callers_run(handle, photos, args.requests, args.calls, args.max_tokens)
        loads = replicas_load(handle, 2)
        split = Counter()
        for load in loads:
            for image in load["images"]:
                split[image] += 1
        one_replica = sum(1 for n in split.values() if n == 1)
        print(f"{label}: {answered} requests in {seconds:.2f} s; requests per replica "
              f"{[load['served'] for load in loads]}; images whose requests all went to one replica: "
              f"{one_replica} of {len(split)}; prompt tokens from the prefix cache "
              f"{sums['cached'] / sums['prompt']:.0%}", flush=True)
        serve.delete("vlm")


def part_death(model, photos, args):
    import ray
    from ray import serve

    handle = deploy(model, 1, 256, None, args.overlay)
    answer(handle.options(stream=True).chat.remote(request(photos[0], "Describe the image.", args.max_tokens)))
    before = replicas_load(handle, 1)[0]
    events: list[tuple[float, str]] = []  # (time, "ok" | error text)
    stop = threading.Event()

    def keep_asking(i: int):
        while not stop.is_set():
            try:
                sent = request(photos[i % len(photos)], f"object {i}", args.max_tokens)
                answer(handle.options(stream=True).chat.remote(sent))
                events.append((time.monotonic(), "ok"))
            except Exception as exc:  # noqa: BLE001 - what the caller gets is the figure
                events.append((time.monotonic(), f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
                time.sleep(0.2)

    threads = [threading.Thread(target=keep_asking, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(5)
    killed_at = time.monotonic()
    for pid in before["engine_cores"]:
        os.kill(pid, signal.SIGKILL)
    print(f"engine death: killed engine-core pid(s) {before['engine_cores']} of replica pid {before['pid']}",
          flush=True)
    recovered = None
    while time.monotonic() - killed_at < args.death_wait:
        time.sleep(1)
        after_kill = [e for e in events if e[0] > killed_at + 0.5]
        oks = [e for e in after_kill if e[1] == "ok"]
        errs = [e for e in after_kill if e[1] != "ok"]
        if errs and oks and oks[-1][0] > errs[-1][0] + 5:
            recovered = min(e[0] for e in oks if e[0] > errs[-1][0]) - killed_at
            break
    stop.set()
    for t in threads:
        t.join(timeout=120)
    errors = Counter(e[1] for e in events if e[0] > killed_at and e[1] != "ok")
    oks_after = sum(1 for e in events if e[0] > killed_at and e[1] == "ok")
    first_error = min((e[0] for e in events if e[0] > killed_at and e[1] != "ok"), default=None)
    oks_before = sum(1 for e in events if e[0] <= killed_at and e[1] == "ok")
    print(f"  answered before the kill: {oks_before}; after: {oks_after}", flush=True)
    print(f"  errors callers got after the kill: {sum(errors.values())}, first at "
          f"{'-' if first_error is None else f'{first_error - killed_at:.1f} s'}", flush=True)
    for text, n in errors.most_common(5):
        print(f"    {n} x {text}", flush=True)
    try:
        after = replicas_load(handle, 1)[0]
        print(f"  answered again {'-' if recovered is None else f'{recovered:.1f} s'} after the kill "
              f"(last error then 5 s of answers); replica pid {before['pid']} -> {after['pid']}, "
              f"engine cores {after['engine_cores']}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"  replica not answering {args.death_wait} s after the kill: {type(exc).__name__}: {exc}", flush=True)
    status = serve.status().applications["vlm"]
    print(f"  Serve status: {status.status}; deployments "
          f"{ {name: d.status for name, d in status.deployments.items()} }", flush=True)
    serve.delete("vlm")
    del ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--overlay", default="", help="a folder with Serve's missing packages (see above)")
    parser.add_argument("--parts", default="1,2,3", help="0: sculpt's engine actor alone")
    parser.add_argument("--pool-cpus", type=int, default=1, help="num_cpus of sculpt's engine actor")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8, help="requests per call")
    parser.add_argument("--calls", type=int, default=3, help="calls per caller")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--death-wait", type=float, default=180, help="seconds to wait for answers after the kill")
    args = parser.parse_args()
    if args.overlay:
        sys.path.insert(1, args.overlay)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ray
    import ray.serve.llm  # noqa: F401 - fails here, with Ray's own words, if Serve's packages are missing

    from sculpt.testing import samples, tiny_internvl

    model = tiny_internvl.write(os.path.join(tempfile.mkdtemp(), "vlm"), train=False)
    import numpy as np

    # one image per caller, all different (mirrored past the sample photographs)
    photos = [samples.jpeg_bytes(np.ascontiguousarray(samples.photo(samples.PHOTOS[i % len(samples.PHOTOS)])
                                                      [:, ::(-1) ** (i // len(samples.PHOTOS))]))
              for i in range(args.callers)]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in [ROOT, args.overlay] if p)}})
    parts = {int(p) for p in args.parts.split(",")}
    warm_callers(args.callers)
    try:
        if 0 in parts:
            pool_run(model, photos, args)
        if 1 in parts:
            part_concurrency(model, photos, args)
        if 2 in parts:
            part_affinity(model, photos, args)
        if 3 in parts:
            part_death(model, photos, args)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
