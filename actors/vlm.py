"""The VLM engine pool: InternVL through vLLM, one pool serving both the caption and the refer stage.

Caption and refer are the same model, so one set of weights serves both: ``vlm_engines`` starts the pool's
engine actors (named, in the job's namespace) before the pipeline runs; the stage actors (``VLMStage``, CPU
only) find them by name and send each image's requests to one replica, where the image prefix is cached.
"""

from __future__ import annotations

import contextlib

from sculpt import errors, images, vlm
from sculpt.stage import Stage


class VLMEngine:
    """One vllm.LLM. ``chat`` takes the images of a batch once and any number of text requests about them.

    When the engine core dies (its process killed, a CUDA fault), the actor ends its own process: Ray restarts
    it with a new engine (``max_restarts=-1``) and retries the call there (``max_task_retries=-1``), so callers
    wait instead of receiving errors.
    """

    def __init__(self, model: str, engine_kwargs: dict, max_tiles: int, min_tiles: int):
        from transformers import AutoConfig
        from vllm import LLM

        trust = bool(engine_kwargs.get("trust_remote_code"))
        model_type = AutoConfig.from_pretrained(model, trust_remote_code=trust).model_type
        tiling = vlm.tiling_kwargs(model_type, max_tiles, min_tiles)
        self.llm = LLM(model=model, mm_processor_kwargs=tiling, limit_mm_per_prompt={"image": 1}, **engine_kwargs)

    def ready(self) -> bool:
        return True

    def chat(self, encoded_images: dict[str, bytes], requests: list[tuple[str, str]], max_tokens: int) -> list[dict]:
        """Greedy answers to (image key, text) requests, in order; the image comes first in every prompt."""
        from PIL import Image
        from vllm import SamplingParams

        pictures = {key: Image.fromarray(images.load_rgb(data)) for key, data in encoded_images.items()}
        conversations = [conversation(pictures[key], text) for key, text in requests]
        try:
            outputs = self.llm.chat(conversations, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
        except Exception as exc:
            if errors.is_transient(exc) and type(exc).__name__ == "EngineDeadError":
                self._restart(exc)
            raise
        return [
            {
                "text": out.outputs[0].text,
                "finish_reason": out.outputs[0].finish_reason,
                "prompt_tokens": len(out.prompt_token_ids),
                "cached_tokens": out.num_cached_tokens or 0,
            }
            for out in outputs
        ]

    def _restart(self, exc: BaseException) -> None:
        import os

        print(f"[sculpt] VLM engine died ({errors.describe(exc)}); restarting this engine actor", flush=True)
        os._exit(1)  # an unexpected exit: Ray restarts the actor and retries the calls in flight

    def shutdown(self) -> None:
        """Stop the engine's worker process now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()

    def prefix_cache(self) -> dict:
        """Cumulative prefix-cache hits and queries (tokens) of this engine."""
        values = {m.name.removeprefix("vllm:"): getattr(m, "value", None) for m in self.llm.get_metrics()}
        return {key: values.get(key) for key in ("prefix_cache_hits", "prefix_cache_queries")}


def conversation(picture, text: str) -> list[dict]:
    """One user turn: the image first, then the text (the order that lets requests share the image prefix)."""
    return [{"role": "user", "content": [{"type": "image_pil", "image_pil": picture}, {"type": "text", "text": text}]}]


@contextlib.contextmanager
def vlm_engines(config, stages, engine_class=VLMEngine):
    """Start the engine pool if a stage needs it; end it (and its placement groups) afterwards."""
    if not any(stage.model_key == "vlm" for stage in stages):
        yield []
        return
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    settings = config.vlm
    engine_kwargs = {"max_model_len": settings.max_model_len, "dtype": settings.dtype,
                     "enforce_eager": settings.enforce_eager, "trust_remote_code": settings.trust_remote_code, "seed": 0,
                     **settings.engine_kwargs}
    plan = vlm.engine_plan(settings.gpus, settings.cpus, settings.tensor_parallel, engine_kwargs)
    engines, groups = [], []
    try:
        for replica in range(settings.replicas):
            options = dict(plan["actor"])
            if plan["bundles"]:
                groups.append(ray.util.placement_group(plan["bundles"], strategy="STRICT_PACK"))
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    groups[-1], placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
            actor = ray.remote(engine_class).options(name=vlm.ENGINE_NAME.format(replica), max_restarts=-1,
                                                  max_task_retries=-1, **options)
            engines.append(actor.remote(config.models.vlm, plan["engine"], settings.max_tiles, settings.min_tiles))
        print(f"[sculpt] starting {len(engines)} VLM engine(s) for {config.models.vlm}", flush=True)
        ray.get([engine.ready.remote() for engine in engines])
        yield engines
    finally:
        for engine in engines:
            ray.kill(engine)
        for group in groups:
            ray.util.remove_placement_group(group)


class VLMStage(Stage):
    """A stage that asks the VLM pool; CPU only, the engines hold the GPUs."""

    model_key = "vlm"

    def setup(self) -> None:
        import ray

        self.engines = []
        while True:
            try:
                self.engines.append(ray.get_actor(vlm.ENGINE_NAME.format(len(self.engines))))
            except ValueError:
                break
        if not self.engines:
            raise RuntimeError(f"stage {self.name}: no VLM engine is running (start them with actors.vlm.vlm_engines)")

    def ask(self, encoded_images: dict[str, bytes], requests: list[tuple[str, str]], max_tokens: int) -> list[dict]:
        """Answers to (image key, text) requests, each image's requests sent to its own replica."""
        import ray

        by_replica: dict[int, list[int]] = {}
        for position, (key, _) in enumerate(requests):
            by_replica.setdefault(vlm.replica_for(key, len(self.engines)), []).append(position)
        calls = {}
        for replica, positions in by_replica.items():
            keys = {requests[p][0] for p in positions}
            calls[replica] = self.engines[replica].chat.remote(
                {k: encoded_images[k] for k in keys}, [requests[p] for p in positions], max_tokens)
        answers: list[dict] = [{}] * len(requests)
        for replica, positions in by_replica.items():
            for position, answer in zip(positions, ray.get(calls[replica])):
                answers[position] = answer
        return answers


def image_key(row: dict) -> str:
    return f"{row['shard']}/{row['index']}"
