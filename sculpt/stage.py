"""The one stage abstraction: declared resources, ``setup()`` once per actor, ``process()`` per batch.

A stage takes the batch's rows (dicts with the pipeline schema) whose status is not ``error``, fills in its
columns in place. A stage marks a failing object on the object and a failing image with
``schema.mark_error``; if ``process`` raises anyway, the batch is retried image by image and only the images
that still fail are marked, so one bad image never takes its batch down with it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import threading
import time
from dataclasses import dataclass

from sculpt import errors, schema



# Stage names the workflow knows without a `class`, in chain order: the default `stages` of a job.
BUILTIN_STAGES: dict[str, str] = {
    "caption": "actors.caption:Captioner",
    "ground": "actors.ground:Grounder",
    "mask": "actors.mask:Masker",
    "instances": "actors.instances:InstanceFinder",
    "refer": "actors.refer:Referrer",
    "listen": "actors.listen:Listener",
    "verify": "actors.verify:Verifier",
    "chat": "actors.chat:Chatter",
}
# Per-stage defaults of the built-in stages (anything a stage's config leaves out). The VLM stages' actors only
# wait on the engine pool, so each keeps 8 batches in flight: with 2, requests waiting on a busy engine left others
# idle (4 nodes: 0.40 of the engines' bound, 0.88-0.92 with 8; docs/BENCHMARKS.md).
STAGE_DEFAULTS: dict[str, dict] = {
    # CPU clients of the VLM engine pool
    "caption": {"cpus": 0.5, "actors": 2, "batch_size": 8, "batches_in_flight": 8},
    "ground": {"gpus": 0.25, "batch_size": 8},  # Florence-2-large, ~0.8 B
    "mask": {"gpus": 0.25, "batch_size": 8},  # SAM2-L, ~0.2 B
    "instances": {"gpus": 0.25, "cpus": 0.5, "batch_size": 8},  # SAM 3, ~0.85 B (sizing.py: its cost)
    "refer": {"cpus": 0.5, "actors": 2, "batch_size": 4, "batches_in_flight": 8},
    "listen": {"cpus": 0.5, "actors": 2, "batch_size": 4, "batches_in_flight": 8},  # a VLM client too
    "verify": {"gpus": 0.5, "batch_size": 8},  # EVF-SAM2, ~0.9 B
    "chat": {"cpus": 0.5, "actors": 2, "batch_size": 4, "batches_in_flight": 8},  # a VLM client, after verify
}


@dataclass(frozen=True)
class Resources:
    cpus: float = 1.0  # logical CPUs each actor holds
    gpus: float = 0.0  # GPUs each actor holds; a fraction lets several small models share one GPU
    memory_gb: float = 0.0  # heap memory each actor reserves (0: no reservation)
    actors: int = 1  # size of the stage's fixed actor pool
    batches_in_flight: int = 2  # batches one actor works on at once; their device parts take turns (DeviceTurn)

    def __post_init__(self):
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"gpus={self.gpus}: above 1 a stage takes whole GPUs")
        if self.actors < 1:
            raise ValueError(f"actors={self.actors}: a stage needs at least one actor")
        if self.batches_in_flight < 1:
            raise ValueError(f"batches_in_flight={self.batches_in_flight}: an actor works on at least one batch")


def actor_options(resources: Resources) -> dict:
    """Ray options that give one actor exactly its resources."""
    options: dict = {"num_cpus": resources.cpus}
    if resources.gpus:
        options["num_gpus"] = resources.gpus
    if resources.memory_gb:
        options["memory"] = int(resources.memory_gb * (1 << 30))
    return options


def ray_options(resources: Resources) -> dict:
    """The Ray Data ``map_batches`` options of a stage: each actor's resources, the fixed pool size and the batches
    each actor runs at once (in threads of its own, so one batch's host work overlaps another's device work)."""
    import ray.data

    n = resources.batches_in_flight
    compute = ray.data.ActorPoolStrategy(size=resources.actors, max_concurrent_calls_per_actor=n,
                                         enable_true_multi_threading=n > 1)
    return {**actor_options(resources), "compute": compute}


class DeviceTurn:
    """The device part of a stage's batch, one batch at a time in each actor (``with stage.device_turn:``).

    The actor runs ``batches_in_flight`` batches in threads; while one holds the turn, the others decode,
    tokenise and encode on the host, so the device waits for no host step. Each thread's waiting time is counted,
    so that a batch's recorded seconds are its own work, not its turn in line.
    """

    def __init__(self):
        self._lock, self._local = threading.Lock(), threading.local()

    def __enter__(self):
        start = time.perf_counter()
        self._lock.acquire()
        self._local.waited = self.waited + time.perf_counter() - start

    def __exit__(self, *exc_info):
        self._lock.release()

    @property
    def waited(self) -> float:
        """Seconds this thread has waited for its turn since ``restart``."""
        return getattr(self._local, "waited", 0.0)

    def restart(self) -> None:
        self._local.waited = 0.0


class Stage:
    """Base class of every pipeline stage. Subclasses set ``name`` and override ``setup`` and ``process``."""

    name: str = "stage"
    model_key: str | None = None  # which entry of the config's `models` section this stage runs
    defaults: dict = {}  # the stage's params when its config leaves them out
    # Guards the stage's model calls (see DeviceTurn); StageActor gives each actor its own. Without one, a stage
    # called directly runs its device part unguarded.
    device_turn = contextlib.nullcontext()

    def __init__(self, resources: Resources = Resources(), batch_size: int = 8, **params):
        self.resources = resources
        self.batch_size = batch_size  # images per process() call
        if self.defaults:
            unknown = set(params) - set(self.defaults) - {"model"}
            if unknown:
                raise ValueError(f"stage {self.name}: unknown param(s) {sorted(unknown)}; known: {sorted(self.defaults)}")
        if self.model_key:
            from sculpt.models import DEFAULT_MODELS

            params.setdefault("model", DEFAULT_MODELS[self.model_key])
        self.params = {**self.defaults, **params}  # settings that change the output: in the job's fingerprint

    @property
    def model_id(self) -> str | None:
        """The model this stage runs (recorded in output markers); None for a stage without one."""
        return self.params.get("model")

    def setup(self) -> None:
        """Load models; runs once in each actor, before the first batch."""

    def process(self, rows: list[dict]) -> None:
        """Fill in this stage's columns of the rows, in place."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "class": f"{type(self).__module__}.{type(self).__qualname__}", "params": self.params}


class DeviceFaults:
    """Job-wide and CPU-less: how often each stage batch has broken a device (``errors.breaks_device``).

    Such a fault leaves the process's CUDA context unusable, so the StageActor that meets it notes the batch here
    and ends its process; Ray starts the actor anew and gives it the same batch again. An actor reads the notes
    when it starts and leaves a batch that has broken a device ``faults.broken_device_limit`` times pending, untried:
    a fault its input causes costs that many restarts, not an endless loop of them.
    """

    def __init__(self):
        self.counts: dict[str, int] = {}

    def note(self, batch: str) -> None:
        self.counts[batch] = self.counts.get(batch, 0) + 1

    def counts_now(self) -> dict[str, int]:
        return dict(self.counts)


def control_actor(cls: type):
    """``cls`` as a CPU-less Ray actor on the driver's node. The job's control state (the ChunkGate, DeviceFaults)
    then ends with the driver and with nothing else: a lost worker node, a spot GPU node taken back, costs only
    the work that was on it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(cls).options(num_cpus=0, scheduling_strategy=here)


def start_device_faults():
    """The job's DeviceFaults actor; the stage actors are given its handle."""
    return control_actor(DeviceFaults).remote()


class StageActor:
    """Runs one Stage inside a Ray Data actor: Arrow batch in, Arrow batch out, same rows, same order.

    A transient fault (``sculpt.errors``) is retried: the batch ``attempts`` times, then each image on its own as
    often; an image whose fault outlasts that carries ``transient_error`` and its unit stays uncommitted. Any
    other exception is that image's error row. Rows with an error of either kind pass through untouched. A fault
    that breaks the device is not retried in the process: the actor restarts (``DeviceFaults``), at most
    ``broken_device_limit`` times for one batch.
    Ray Data calls an actor from ``resources.batches_in_flight`` threads at once; the stage's model calls take
    turns through ``stage.device_turn``.
    """

    def __init__(self, stage: Stage, attempts: int = 3, backoff_seconds: float = 2.0, last: bool = False,
                 device_faults=None, broken_device_limit: int = 2):
        self.stage, self.attempts, self.backoff = stage, attempts, backoff_seconds
        self.broken_device_limit = broken_device_limit  # faults.broken_device_limit
        self.last = last  # the chain's last stage: no one downstream needs the encoded image
        # the job's DeviceFaults actor, and the batches that have broken a device so far; None outside a job
        self.device_faults, self.broke_before = device_faults, {}
        self.restarting = threading.Lock()  # taken by the thread that ends the process: see _restart_unless_outside_a_job
        if device_faults is not None:
            import ray

            self.broke_before = ray.get(device_faults.counts_now.remote())
        stage.device_turn = DeviceTurn()

        def again(attempt, exc):
            print(f"[sculpt] {stage.name}: transient fault in setup, retry {attempt + 1} of {attempts - 1}: "
                  f"{errors.describe(exc)}", flush=True)

        # Ray Data fails the whole dataset when an actor's constructor raises: a transient fault of the load (out
        # of GPU memory while another process lets go of it) is retried here, as a batch's would be
        errors.retrying(stage.setup, attempts, backoff_seconds, again)

    def _process(self, rows: list[dict]) -> None:
        """The stage on the rows, retried on transient faults. Each try works on its own copy of the rows and only
        a try that succeeds is kept: one that fails part-way (the first images' objects added, then an
        out-of-memory error) must leave nothing behind for the next try to add to again."""

        def attempt() -> list[dict]:
            trial = copy.deepcopy(rows)  # bytes and strings are shared, not copied: about a millisecond a batch
            self.stage.process(trial)
            return trial

        def say(attempt, exc):
            print(f"[sculpt] {self.stage.name}: transient fault on {len(rows)} image(s), retry {attempt + 1} of "
                  f"{self.attempts - 1}: {errors.describe(exc)}", flush=True)

        for row, done in zip(rows, errors.retrying(attempt, self.attempts, self.backoff, say)):
            row.clear()
            row.update(done)

    def _restart_unless_outside_a_job(self, batch: str, fault: Exception) -> None:
        """After a fault that breaks the device: note the batch and end the process, so that Ray starts the actor
        anew and gives it the batch again (DeviceFaults). Outside a job, return: the images are left pending."""
        if self.device_faults is None or not errors.breaks_device(fault):
            return
        import ray

        # Never released: the batch running beside the one that broke the device meets the same fault, and waits
        # here for the end instead of being noted too (Ray gives it to the new actor just the same).
        self.restarting.acquire()
        ray.get(self.device_faults.note.remote(batch))
        print(f"[sculpt] {self.stage.name}: {errors.describe(fault)}; the device is unusable: restarting this actor, "
              "which is given the batch again", flush=True)
        os._exit(1)

    def __call__(self, batch):
        rows = batch.to_pylist()
        todo = [row for row in rows if row["status"] != schema.ERROR and not row["transient_error"]]
        batch_key = f"{self.stage.name}/{todo[0]['unit']}/{todo[0]['index']}+{len(todo)}" if todo else ""
        if todo and self.broke_before.get(batch_key, 0) >= self.broken_device_limit:
            for row in todo:
                row["transient_error"] = (f"{self.stage.name}: this batch broke the device {self.broken_device_limit} "
                                          "times (a fault its input causes); left for the next run, untried")
        elif todo:
            self.stage.device_turn.restart()
            started = time.perf_counter()
            try:
                self._process(todo)
            except Exception as exc:
                self._restart_unless_outside_a_job(batch_key, exc)
                for row in todo:  # find the images that fail on their own; the rest keep their results
                    try:
                        self._process([row])
                    except Exception as exc:
                        self._restart_unless_outside_a_job(batch_key, exc)
                        if errors.is_transient(exc):
                            row["transient_error"] = f"{self.stage.name}: {errors.describe(exc)}"
                        else:
                            schema.mark_error(row, self.stage.name, exc)
            share = (time.perf_counter() - started - self.stage.device_turn.waited) / len(todo)
            for row in todo:
                row["stage_seconds"] = (row["stage_seconds"] or []) + [{"stage": self.stage.name, "seconds": share}]
        if self.last:  # the image's bytes (~0.6 MB) go no further: what reaches the driver is the annotation
            for row in rows:
                row["image_bytes"] = None
        return schema.to_table(rows)


def actor_class(stage: Stage) -> type:
    """A StageActor subclass named after the stage, so that processes and the dashboard say which stage runs
    (``MapBatches(GroundStage)``, not ``MapBatches(StageActor)`` for every stage)."""
    name = "".join(part.capitalize() for part in re.split(r"[^0-9a-zA-Z]+", stage.name) if part) + "Stage"
    return type(name, (StageActor,), {"__module__": __name__})
