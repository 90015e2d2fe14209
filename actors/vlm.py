"""The VLM engine pool: InternVL through vLLM, one pool serving both the caption and the refer stage.

Caption and refer are the same model, so one set of weights serves both: ``vlm_engines`` starts the pool's
engine actors (named, in the job's namespace) before the pipeline runs; the stage actors (``VLMStage``, CPU
only) find them by name and send each image's requests to one replica, where the image prefix is cached.
With ``vlm.endpoint`` no engine starts: ``vlm_engines`` checks that server and hands the stages an ``Endpoint``,
which sends them the same conversations over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from sculpt import errors
from sculpt.annotation import images
from sculpt.engine import vlm
from sculpt.stage import Stage


# Times a request vLLM answered with its retryable error is sent again (vLLM's protocol, not a fault: it asks the
# client to send the image again, and the next send carries it). Not a faults.* knob: one resend cures a cache drift,
# the rest are a margin; a request still refused then is ``errors.SpentRetries``, its images tried once each.
RESENDS = 3


class VLMEngine:
    """One vLLM engine (``AsyncLLM``): every caller's requests reach its continuous batching at once.

    ``chat`` takes the images of a batch once and any number of text requests about them; it may be called from
    many threads at once (the Ray actor is threaded, ``max_concurrency`` = ``max_in_flight``). Each call decodes
    its images in its own thread, then hands its conversations to the one event loop that owns the engine
    (``EngineLoop``), which renders them (chat template, image tiling) and sends one ``generate`` per request,
    so vLLM schedules the requests of all callers together (up to ``max_in_flight``) instead of one ``LLM.chat``
    call after another.

    When the engine core dies (its process killed, a CUDA fault), the actor ends its own process: Ray restarts
    it with a new engine (``max_restarts=-1``) and sends the calls in flight there again, up to
    ``faults.engine_call_retries`` times, so callers wait instead of receiving errors. A call the engine dies on every
    time then fails (``VLMStage.ask`` raises ``errors.SpentRetries``): its stage tries its images one by one and
    leaves the one the engine dies on pending, instead of the engine restarting forever. A start that fails (out of
    GPU memory, its core killed) is tried again (``retried_start``); a replica that still cannot start is dead for
    the job, and the stages send its images to the live ones (``VLMStage.ask``).
    """

    def __init__(self, model: str, engine_kwargs: dict, max_tiles: int, min_tiles: int, max_in_flight: int = 256):
        from transformers import AutoConfig

        # vLLM times chat-template renders (against a client's malicious template) from when they queue behind
        # every other caller's on its render thread; this is the model's own template
        os.environ.setdefault("VLLM_CHAT_TEMPLATE_RENDER_TIMEOUT", "0")
        trust = bool(engine_kwargs.get("trust_remote_code"))
        model_type = AutoConfig.from_pretrained(model, trust_remote_code=trust).model_type
        try:
            self.loop = EngineLoop(dict(model=model, mm_processor_kwargs=vlm.tiling_kwargs(model_type, max_tiles, min_tiles),
                                        limit_mm_per_prompt={"image": 1}, **engine_kwargs), max_in_flight)
        except RuntimeError as exc:
            # vLLM's one message for a core process that died while it started, whatever killed it (out of GPU
            # memory, a kill): another start may succeed, so it is transient for retried_start
            if "Engine core initialization failed" not in str(exc):
                raise
            raise errors.TransientError(f"the vLLM engine core failed to start ({errors.describe(exc)})") from exc

    def ready(self) -> bool:
        return True

    def chat(self, encoded_images: dict[str, bytes], requests: list[tuple[str, str]], max_tokens: int) -> list[dict]:
        """Greedy answers to (image key, text) requests, in order; the image comes first in every prompt."""
        from PIL import Image
        from vllm import SamplingParams

        pictures = {key: Image.fromarray(images.load_rgb(data)) for key, data in encoded_images.items()}
        conversations = [conversation({"type": "image_pil", "image_pil": pictures[key], "uuid": key}, text)
                         for key, text in requests]
        try:
            return self.answer(conversations, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        except Exception as exc:
            if self.loop.engine.errored or type(exc).__name__ == "EngineDeadError":
                print(f"[sculpt] VLM engine died ({errors.describe(exc)}); restarting this engine actor", flush=True)
                end_process()
            raise

    def answer(self, conversations: list, params) -> list[dict]:
        """Answers to conversations, resending those vLLM finished with its retryable ``error``.

        vLLM returns ``finish_reason="error"`` when its frontend and engine-core image caches drift apart (it
        drops the image from the frontend cache and expects the client to resend); rendering again sends the
        image data itself.
        """
        answers: list[dict] = [{}] * len(conversations)
        todo = list(range(len(conversations)))
        for _ in range(RESENDS + 1):
            for i, answer in zip(todo, self.loop.generate([conversations[i] for i in todo], params)):
                answers[i] = answer
            todo = [i for i in todo if answers[i]["finish_reason"] == "error"]
            if not todo:
                return answers
        # resent here already: another try of the batch would resend them as often again (errors.SpentRetries)
        raise errors.SpentRetries(f"vLLM answered {len(todo)} request(s) with its retryable error {RESENDS + 1} times")

    def load(self) -> dict:
        """Requests in the engine now, the most it has held at once, how many it has answered, and how many it
        finished with its retryable error (each sent again)."""
        return {"in_flight": self.loop.in_flight, "peak_in_flight": self.loop.peak_in_flight, "served": self.loop.served,
                "retryable_errors": self.loop.retryable_errors}

    def core_pids(self) -> list[int]:
        """This engine's core processes: the ones an operator attaches a profiler to, or kills to try the restart."""
        # vLLM's own handles on the processes it started (no public accessor): listing this process's children by
        # their title, VLLM::EngineCore, found none in 2 of 8 suite runs. tests/test_vlm.py fails if these change.
        return [process.pid for process in self.loop.engine.engine_core.resources.engine_manager.processes]

    def shutdown(self) -> None:
        """Stop the engine's core process now rather than at interpreter exit."""
        self.loop.stop()

    def prefix_cache(self) -> dict:
        """Cumulative prefix-cache hits and queries (tokens) of this engine."""
        from vllm.v1.metrics.reader import get_metrics_snapshot

        values = {m.name.removeprefix("vllm:"): getattr(m, "value", None) for m in get_metrics_snapshot()}
        return {key: values.get(key) for key in ("prefix_cache_hits", "prefix_cache_queries")}


class EngineLoop:
    """vLLM's ``AsyncLLM`` on an event loop of its own thread, fed from any thread.

    (Kept apart from VLMEngine: Ray makes an actor with any ``async def`` an asyncio actor, whose synchronous
    methods would then block its one loop and serve callers one at a time.)
    """

    def __init__(self, engine_args: dict, max_in_flight: int):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="vlm-engine-loop", daemon=True).start()
        self.max_in_flight, self.in_flight, self.peak_in_flight = max_in_flight, 0, 0
        self.served, self.retryable_errors = 0, 0
        try:
            self._run(self._start(engine_args))
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)  # the next start has a loop of its own
            raise

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _start(self, engine_args: dict) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.renderers.params import ChatParams
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))
        # What LLM.chat does: the model's chat template, a generation prompt, no extra special tokens.
        self.chat_params = ChatParams(chat_template_kwargs={"add_generation_prompt": True, "continue_final_message": False,
                                                            "tools": None, "tokenize": False})
        self.tok_params = self.engine.renderer.default_chat_tok_params.with_kwargs(add_special_tokens=False)
        self.slots = asyncio.Semaphore(self.max_in_flight)

    def generate(self, conversations: list, params) -> list[dict]:
        """Answers to chat conversations, from any thread."""
        return self._run(self._answers(conversations, params))

    async def _answers(self, conversations: list, params) -> list[dict]:
        # Rendered on this loop, where vLLM's renderer processes images on its one worker thread in arrival order:
        # the frontend's image cache then tells the engine core "cached" only of images sent to it before
        # (rendered from many threads at once, requests overtook each other and vLLM's cache asserted).
        _, prompts = await self.engine.renderer.render_chat_async(conversations, self.chat_params, self.tok_params)
        return list(await asyncio.gather(*(self._answer(p, params) for p in prompts)))

    async def _answer(self, prompt, params) -> dict:
        async with self.slots:
            self.in_flight += 1  # only the loop's thread touches these counters
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                async for final in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex):
                    pass
            finally:
                self.in_flight -= 1
        out = final.outputs[0]
        if out.finish_reason == "error":
            self.retryable_errors += 1
        else:
            self.served += 1
        return {"text": out.text, "finish_reason": out.finish_reason, "prompt_tokens": len(final.prompt_token_ids),
                "cached_tokens": final.num_cached_tokens or 0}

    def stop(self) -> None:
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _stop(self) -> None:
        self.engine.shutdown()
        self.engine = None  # collected now, while the interpreter can still run its finaliser
        await asyncio.sleep(0.1)  # let the engine's cancelled tasks finish on this loop


def end_process() -> None:
    """End this actor's process, and its children with it: an unexpected exit, so Ray restarts the actor and
    retries the calls in flight. The engine core is a child process that outlives ``os._exit`` (seen for
    minutes on the CPU); left running, it would hold the GPU memory the restarted actor's engine needs."""
    kill_children()
    os._exit(1)


def kill_children() -> None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def retried_start(engine_class: type, attempts: int, backoff: float) -> type:
    """``engine_class`` whose start is tried up to ``attempts`` times while it fails transiently (out of GPU memory,
    its vLLM core killed while it starts), waiting backoff·2^k before the k-th retry: Ray restarts no actor whose
    constructor raised, so one failed start would leave the replica dead for the rest of the job."""

    def __init__(self, *args):
        def again(attempt, exc):
            import ray

            kill_children()  # what the failed start left running holds memory the next one needs
            print(f"[sculpt] {ray.get_runtime_context().get_actor_name()}: the engine failed to start "
                  f"({errors.describe(exc)}); start {attempt + 2} of {attempts}", flush=True)

        errors.retrying(lambda: engine_class.__init__(self, *args), attempts, backoff, again)

    return type(engine_class.__name__, (engine_class,), {"__init__": __init__})


def conversation(image: dict, text: str) -> list[dict]:
    """One user turn: the image first, then the text (the order that lets requests share the image prefix), for
    the engines and for an endpoint alike.

    ``image`` is the turn's image part: for an engine the decoded picture, whose ``uuid`` names it (``image_key``:
    one per image of a job) for vLLM's multimodal caches, which otherwise hash every request's full-size pixels
    (~10 MB for an SA-1B image; dozens of requests per image); for an endpoint its data URL (``Endpoint``)."""
    return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]


class EndpointError(Exception):
    """A VLM server's answer that is no fault of the server (400: a request it cannot serve): the image's error row."""


class Endpoint:
    """An OpenAI-compatible server the user already runs (``vlm.endpoint``), asked instead of the engine pool.

    Each stage actor holds one: an ``openai`` client, whose own retries (``faults.engine_call_retries``, backing
    off and heeding the server's Retry-After) and timeout (``vlm.timeout_seconds``) each request gets, and
    ``in_flight`` threads that send the requests of all the actor's batches (``vlm.max_in_flight`` shared among
    the actors: the job's bound at the server). The requests are the engines' conversations (``conversation``),
    the image as a data URL (``vlm.image_url``), so the server's prefix cache computes each image once. A fault
    past the client's retries that ``errors.RULES`` calls transient (unreachable, a timeout, 429, 5xx) is raised
    as ``SpentRetries``, as a call to a dead engine past Ray's resends is: the batch is not tried again, each
    image once more, then its unit waits for the next run.

    The API key is read from the variable ``vlm.api_key_env`` names where the requests are sent (every node needs
    it; a new local Ray's workers have the driver's): never pickled, written or logged, and cut out of every
    message this raises.
    """

    def __init__(self, url: str, model: str, key_env: str, timeout: float, retries: int, in_flight: int):
        self.url, self.model, self.key_env = url.rstrip("/"), model, key_env
        self.timeout, self.retries, self.in_flight = timeout, retries, in_flight
        self.client = self.senders = self.key = None

    def __getstate__(self) -> dict:  # to a stage actor without the client, its threads or the key
        return {**self.__dict__, "client": None, "senders": None, "key": None}

    @property
    def shown(self) -> str:
        return vlm.shown_url(self.url)

    def connect(self) -> None:
        if self.client is not None:
            return
        try:
            import openai
        except ImportError:
            raise errors.JobError("vlm.endpoint needs the openai package: pip install 'sculpt[endpoint]'") from None
        logging.getLogger("httpx").setLevel(logging.WARNING)  # else a log line per request
        self.key = os.environ.get(self.key_env) or None
        self.client = openai.OpenAI(base_url=self.url, api_key=self.key or "none", max_retries=self.retries,
                                    timeout=self.timeout)
        self.senders = ThreadPoolExecutor(self.in_flight, thread_name_prefix="vlm-endpoint")

    def check(self, models: set[str], attempts: int, backoff: float) -> None:
        """Refuse, with one line, a server that does not answer (each of ``attempts`` tries past the client's
        retries), refuses the key, or serves none of ``models`` under that name."""
        self.connect()

        def again(attempt, exc):
            print(f"[sculpt] the VLM server at {self.shown} does not answer ({self.redacted(exc)}); try "
                  f"{attempt + 2} of {attempts}", flush=True)

        try:
            served = {model.id for model in errors.retrying(self.client.models.list, attempts, backoff, again)}
        except Exception as exc:
            raise errors.JobError(self.refusal(exc)) from None
        if set(models) - served:
            raise errors.JobError(f"the VLM server at {self.shown} serves {sorted(served)}, not "
                                  f"{sorted(set(models) - served)}: set models.vlm to the name it serves its model "
                                  "under (its --served-model-name, else the path it was started with)")

    def refusal(self, exc: BaseException) -> str:
        line, name = self.redacted(exc), type(exc).__name__
        if name in ("AuthenticationError", "PermissionDeniedError"):
            given = f"the key in ${self.key_env}" if self.key else f"no key (${self.key_env} is not set)"
            return (f"the VLM server at {self.shown} refused {given} ({line}); set {self.key_env} to the key it was "
                    "started with (vlm.api_key_env names the variable)")
        if errors.classify(exc) is errors.TRANSIENT:
            return f"the VLM server at {self.shown} does not answer ({line}); start it, or fix vlm.endpoint"
        return (f"the VLM server at {self.shown} could not list its models ({line}); vlm.endpoint must be an "
                "OpenAI-compatible server's /v1 URL")

    def redacted(self, exc: BaseException) -> str:
        return vlm.redact(errors.describe(exc), self.key)

    def chat(self, encoded_images: dict[str, bytes], requests: list[tuple[str, str]], max_tokens: int) -> list[dict]:
        """Greedy answers to (image key, text) requests, in order, as ``VLMEngine.chat`` gives them."""
        urls = {key: vlm.image_url(encoded_images[key]) for key in dict.fromkeys(key for key, _ in requests)}
        sent = [self.senders.submit(self.send, conversation({"type": "image_url", "image_url": {"url": urls[key]}},
                                                            text), max_tokens) for key, text in requests]
        try:
            return [request.result() for request in sent]
        except Exception as exc:
            for request in sent:
                request.cancel()
            raise self.fault(exc) from None  # not chained: the client's exception holds the request, key and all

    def send(self, messages: list[dict], max_tokens: int) -> dict:
        return vlm.endpoint_answer(self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=0.0))

    def fault(self, exc: BaseException) -> Exception:
        if errors.classify(exc) is errors.TRANSIENT:
            return errors.SpentRetries(f"the VLM server at {self.shown} failed past its client's {self.retries} "
                                       f"retries (faults.engine_call_retries): {self.redacted(exc)}")
        return EndpointError(f"the VLM server at {self.shown} refused the request: {self.redacted(exc)}")


def use_endpoint(config, stages) -> None:
    """Hand each VLM stage the server of ``vlm.endpoint`` (before the stages go to their actors), once it answers
    and serves their models."""
    settings = config.vlm
    each = vlm.in_flight_each(settings.max_in_flight, sum(stage.resources.actors for stage in stages))
    for stage in stages:
        stage.endpoint = Endpoint(settings.endpoint, stage.model_id, settings.api_key_env, settings.timeout_seconds,
                                  config.faults.engine_call_retries, each)
    models = {stage.model_id for stage in stages}
    stages[0].endpoint.check(models, config.faults.attempts, config.faults.backoff_seconds)
    for stage in stages:
        stage.processor = settings.processor
        profile = vlm.profile_of(settings.profile, stage.model_id)  # as planning resolves it
        if not profile.relative:  # its boxes are in pixels of its resized input: the served checkpoint's rule
            try:
                resized_input(stage.processor or stage.model_id)
            except (OSError, ValueError) as exc:
                raise errors.BadInput(
                    f"vlm.endpoint with the {profile.label} profile: its boxes are in pixels of the model's resized "
                    f"input, and no image processor loads from {stage.processor or stage.model_id!r} "
                    f"({errors.describe(exc)}); set vlm.processor to the served model's Hub id or folder") from None
    print(f"[sculpt] no VLM engines: asking the server at {stages[0].endpoint.shown} for {', '.join(sorted(models))}, "
          f"at most {each} request(s) in flight from each of the {', '.join(s.name for s in stages)} actors", flush=True)


@contextlib.contextmanager
def vlm_engines(config, stages, engine_class=VLMEngine):
    """Start the engine pool if a stage needs it, and yield the engines that started; end it (and its placement
    groups) afterwards. With ``vlm.endpoint``, start none: hand the stages that server (``use_endpoint``)."""
    if not any(stage.model_key == "vlm" for stage in stages):
        yield []
        return
    if config.vlm.endpoint:
        use_endpoint(config, [stage for stage in stages if stage.model_key == "vlm"])
        yield []
        return
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    settings = config.vlm
    engine_kwargs = {"max_model_len": settings.max_model_len, "dtype": settings.dtype,
                     "enforce_eager": settings.enforce_eager, "trust_remote_code": settings.trust_remote_code, "seed": 0,
                     "use_tqdm_on_load": False, **settings.engine_kwargs}  # sculpt's own line tells of the start
    plan = vlm.engine_plan(settings.gpus, settings.cpus, settings.tensor_parallel, engine_kwargs)
    started = retried_start(engine_class, config.faults.attempts, config.faults.backoff_seconds)
    engines, groups = [], []
    try:
        for replica in range(settings.replicas):
            options = dict(plan["actor"])
            if plan["bundles"]:
                groups.append(ray.util.placement_group(plan["bundles"], strategy="STRICT_PACK"))
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    groups[-1], placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
            actor = ray.remote(started).options(name=vlm.ENGINE_NAME.format(replica), max_restarts=-1,
                                                max_task_retries=config.faults.engine_call_retries,
                                                max_concurrency=settings.max_in_flight, **options)
            engines.append(actor.remote(config.models.vlm, plan["engine"], settings.max_tiles, settings.min_tiles,
                                        settings.max_in_flight))
        print(f"[sculpt] starting {len(engines)} VLM engine(s) for {config.models.vlm}", flush=True)
        yield live_engines(engines)
    finally:
        for engine in engines:
            ray.kill(engine)
        for group in groups:
            ray.util.remove_placement_group(group)


def live_engines(engines: list) -> list:
    """The engines that started (each start tried ``faults.attempts`` times); the job goes on with them, saying so
    in one line. None: a JobError."""
    import ray

    live, faults = [], []
    for engine in engines:
        try:
            ray.get(engine.ready.remote())
            live.append(engine)
        except ray.exceptions.RayActorError as exc:
            faults.append(creation_fault(exc))
    if not live:
        raise errors.JobError(f"no VLM engine could start ({faults[0]}); see the engine's log above, and check "
                              "models.vlm and the vlm section (gpus, max_model_len, engine_kwargs)")
    if faults:
        print(f"[sculpt] {len(faults)} of {len(engines)} VLM engines could not start ({faults[0]}); the job goes on "
              f"with {len(live)}", flush=True)
    return live


def creation_fault(exc: BaseException) -> str:
    """What made an engine's constructor fail: the last line of Ray's message (its traceback's)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class VLMStage(Stage):
    """A stage that asks the VLM pool; CPU only, the engines hold the GPUs."""

    model_key = "vlm"
    endpoint: Endpoint | None = None  # vlm.endpoint's server (vlm_engines hands it over); None: the engine pool
    profile: str = "auto"  # vlm.profile, resolved for the job by planning (sculpt.engine.planning.vlm_profiles)
    processor: str | None = None  # vlm.processor (use_endpoint): whose image processor resizes; None: the model's
    _conventions = None  # (the profile, its resized-input rule or None), found at the first use

    def boxes(self, width: int, height: int) -> dict:
        """How boxes of an image of this size are written and read: the keyword arguments (``profile``,
        ``input_size``) of ``sculpt.annotation.prompts``' box functions, in the model family's convention."""
        if self._conventions is None:
            profile = vlm.profile_of(self.profile, self.model_id)
            self._conventions = (profile, None if profile.relative else resized_input(self.processor or self.model_id))
        profile, rule = self._conventions
        return {"profile": profile, "input_size": rule(width, height) if rule else None}

    def setup(self) -> None:
        import ray

        if self.endpoint is not None:
            self.endpoint.connect()
            return
        self.engines = [ray.get_actor(name) for name in vlm.engine_names(ray.util.list_named_actors())]
        self.down: set[int] = set()  # replicas whose restart failed: dead for the job
        if not self.engines:
            raise RuntimeError(f"stage {self.name}: no VLM engine is running (start them with actors.vlm.vlm_engines)")

    def ask(self, encoded_images: dict[str, bytes], requests: list[tuple[str, str]], max_tokens: int) -> list[dict]:
        """Answers to (image key, text) requests, each image's requests sent to its own replica; those of a replica
        that could not start again, to the live ones; or all to ``vlm.endpoint``'s server."""
        import ray

        if self.endpoint is not None:
            return self.endpoint.chat(encoded_images, requests, max_tokens)

        by_replica: dict[int, list[int]] = {}
        for position, (key, _) in enumerate(requests):
            replica = vlm.replica_for(key, len(self.engines), self.down)
            if replica is None:  # transient: the units stay pending for the next run
                raise errors.SpentRetries(f"no VLM engine is left: all {len(self.engines)} failed to start again")
            by_replica.setdefault(replica, []).append(position)
        calls = {}
        for replica, positions in by_replica.items():
            keys = {requests[p][0] for p in positions}
            calls[replica] = self.engines[replica].chat.remote(
                {k: encoded_images[k] for k in keys}, [requests[p] for p in positions], max_tokens)
        answers: list[dict] = [{}] * len(requests)
        for replica, positions in by_replica.items():
            try:
                replies = ray.get(calls[replica])
            except ray.exceptions.RayActorError as exc:
                if exc.actor_init_failed:  # its restart failed each try: the engine is gone, the request is not at fault
                    self.lose(replica, exc)
                    replies = self.ask(encoded_images, [requests[p] for p in positions], max_tokens)
                else:
                    # Ray has sent the call to the restarted engine already: another try of the whole batch would
                    # cost as many engine restarts again, so only its images are tried, one by one
                    raise errors.SpentRetries(f"the VLM engine died on this call and on each resend to its restarted "
                                              f"engine (faults.engine_call_retries) ({errors.describe(exc)})") from exc
            for position, answer in zip(positions, replies):
                answers[position] = answer
        return answers

    def lose(self, replica: int, exc: BaseException) -> None:
        if replica not in self.down:
            self.down.add(replica)
            print(f"[sculpt] {self.name}: VLM engine {replica} could not start again ({creation_fault(exc)}); its "
                  f"images go to the other {len(self.engines) - len(self.down)}", flush=True)


def resized_input(model: str):
    """The size (width, height) of the model's resized input for an image's (width, height), by its image
    processor's own rule (transformers' ``smart_resize`` with the checkpoint's pixel bounds, patch and merge sizes):
    Qwen2.5-VL's boxes are in its pixels."""
    from transformers import AutoImageProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    processor = AutoImageProcessor.from_pretrained(model)
    factor = processor.patch_size * processor.merge_size
    least, most = processor.size["shortest_edge"], processor.size["longest_edge"]  # pixels, as its resize reads them

    def input_size(width: int, height: int) -> tuple[int, int]:
        resized_height, resized_width = smart_resize(height, width, factor=factor, min_pixels=least, max_pixels=most)
        return resized_width, resized_height

    return input_size


def image_key(row: dict) -> str:
    return f"{row['shard']}/{row['index']}"
