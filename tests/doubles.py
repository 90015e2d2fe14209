"""Test doubles for model stages, and a clock for the lease. They live here only; the benchmark borrows them from
here."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

from sculpt.annotation import images, rle
from sculpt.outputs.store import OutputStore
from sculpt.stage import Stage


class HoldGpu(Stage):
    """Holds its actor's resources for a fixed service time per image and appends its name to the caption.

    In setup it logs pid, Ray's GPU ids and CUDA_VISIBLE_DEVICES to ``log_dir`` (one JSON file per actor).
    Images whose key is in ``fail_keys`` raise, to exercise per-image error marking. ``work_log``: a file per actor,
    a line per image worked on. While the file ``pause_file`` exists, an actor that has worked on ``pause_after``
    images starts no batch (a test's kill then lands mid-run however slow the machine; it deletes the file after).
    """

    name = "hold"

    def setup(self):
        import ray

        self.seconds = float(self.params.get("seconds_per_image", 0.0))
        log_dir = self.params.get("log_dir")
        if log_dir:
            record = {
                "stage": self.name,
                "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            }
            path = os.path.join(log_dir, f"{self.name}-{os.getpid()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(record, f)
            os.replace(path + ".tmp", path)  # readers never see half a record

    def process(self, rows):
        pause = self.params.get("pause_file")
        if pause:
            deadline = time.monotonic() + 300  # a test that failed before deleting it holds the actor no longer
            while (getattr(self, "worked", 0) >= self.params.get("pause_after", 0) and os.path.exists(pause)
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        time.sleep(self.seconds * len(rows))
        for row in rows:
            if row["image_key"] in self.params.get("fail_keys", ()):
                raise RuntimeError(f"injected failure on {row['image_key']}")
            row["caption"] = (row["caption"] or "") + f"{self.name};"
        if self.params.get("work_log"):  # one line per image worked on (benchmarks count the work a kill loses)
            with open(os.path.join(self.params["work_log"], f"{os.getpid()}.txt"), "a") as f:
                f.write("".join(f"{row['shard']}/{row['index']}\n" for row in rows))
        self.worked = getattr(self, "worked", 0) + len(rows)


class ThresholdMasker(Stage):
    """Decodes the image and adds one object whose mask is the image's dark half (a real RLE via pycocotools)."""

    name = "threshold"

    def process(self, rows):
        for row in rows:
            image = images.load_rgb(row["image_bytes"])
            gray = image.mean(axis=2)
            mask = gray < np.median(gray)
            encoded = rle.encode(mask)
            ys, xs = np.nonzero(mask)
            row["objects"] = (row["objects"] or []) + [
                {
                    "phrase": "dark half",
                    "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)],
                    "mask": encoded,
                    "area": rle.area(encoded),
                    "mask_score": 1.0,
                    "kept": True,
                }
            ]


class ThresholdReferrer(ThresholdMasker):
    """ThresholdMasker's object with a referring expression: one exportable pair per image."""

    name = "referrer"

    def process(self, rows):
        super().process(rows)
        for row in rows:
            for obj in row["objects"]:
                obj.update(expression="the dark half", category="stuff", iou=1.0)


class Faulty(Stage):
    """Adds its name to the caption; raises for chosen images, the way real faults arrive.

    - ``transient_keys`` fail with a CUDA-style out-of-memory error the first ``transient_times`` times each;
    - while the file ``fault_file`` exists, images of ``fault_shards`` fail with ConnectionResetError;
    - while the file ``broken_file`` exists, the image keys it lists (one per line) fail with a permanent error;
    - ``device_fault_keys`` fail with an illegal memory access, every time or, given ``device_fault_file``, once
      (the first to come while the file exists removes it); as on a real device, every later batch in that
      process fails the same way;
    - every batch first takes ``hold_seconds`` (so that an actor's batches in flight overlap);
    - each actor records its pid in ``pid_dir`` (a file per pid) when it starts.
    """

    name = "faulty"

    def setup(self):
        self.seen: dict[str, int] = {}
        if self.params.get("pid_dir"):
            open(os.path.join(self.params["pid_dir"], str(os.getpid())), "w").close()

    def process(self, rows):
        import torch

        p = self.params
        time.sleep(p.get("hold_seconds", 0.0))
        if getattr(self, "device_broken", False):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (an earlier batch's)")
        for row in rows:
            key = row["image_key"]
            if key in p.get("transient_keys", ()):
                self.seen[key] = self.seen.get(key, 0) + 1
                if self.seen[key] <= p.get("transient_times", 1):
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            if p.get("fault_file") and os.path.exists(p["fault_file"]) and row["shard"] in p.get("fault_shards", ()):
                raise ConnectionResetError(104, "Connection reset by peer (injected)")
            if key in p.get("device_fault_keys", ()):
                once = p.get("device_fault_file")
                if not once or os.path.exists(once):
                    if once:
                        os.unlink(once)
                    self.device_broken = True
                    raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            if p.get("broken_file") and os.path.exists(p["broken_file"]):
                if key in open(p["broken_file"]).read().split():
                    raise ValueError(f"injected permanent failure on {key}")
        for row in rows:
            row["caption"] = (row["caption"] or "") + f"{self.name};"


class TakesTurns(Stage):
    """A batch's host part (``host_seconds`` per image) and device part (``device_seconds``, a sleep that releases
    the GIL, inside ``device_turn``). Each row's caption records how many batches the actor held at once, and how
    many were inside the device turn at once, as the actor saw them when the row's batch ended ("held,turn")."""

    name = "turns"

    def setup(self):
        import threading

        self.lock, self.held, self.in_turn, self.most = threading.Lock(), 0, 0, [0, 0]

    def _count(self, held=0, in_turn=0):
        with self.lock:
            self.held += held
            self.in_turn += in_turn
            self.most = [max(self.most[0], self.held), max(self.most[1], self.in_turn)]

    def process(self, rows):
        self._count(held=1)
        time.sleep(float(self.params.get("host_seconds", 0.0)) * len(rows))
        with self.device_turn:
            self._count(in_turn=1)
            time.sleep(float(self.params.get("device_seconds", 0.0)) * len(rows))
            # until the actor has held two batches at once (or ``wait_for_two_seconds`` pass): on a loaded machine
            # the next batch can arrive after the sleeps end, which is no proof that the actor could not hold it
            deadline = time.monotonic() + float(self.params.get("wait_for_two_seconds", 0.0))
            while self.most[0] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            self._count(in_turn=-1)
        self._count(held=-1)
        for row in rows:
            row["caption"] = f"{self.most[0]},{self.most[1]}"


class FailingStore(OutputStore):
    """An output store whose writes of one unit's data file fail (runs where commits run): ``fault`` is an errno
    (``OSError``), an exception to raise, a function that makes it (one that cannot travel to the task itself), or
    "exit" (the commit's worker dies, every try)."""

    def __init__(self, uri: str, unit: str, fault):
        super().__init__(uri)
        self.unit, self.fault = unit, fault

    def staged_uri(self, unit: str) -> str:
        if unit == self.unit:
            if self.fault == "exit":
                os._exit(1)
            if isinstance(self.fault, int):
                raise OSError(self.fault, f"{os.strerror(self.fault)} (injected)")
            raise self.fault() if callable(self.fault) else self.fault
        return super().staged_uri(unit)


class TimedEngine:
    """Stands in for actors.vlm.VLMEngine with a service time: ``slots`` requests at once, ``seconds`` each.

    Like vLLM's continuous batching, requests from all callers share the slots (the actor is threaded); a
    caption comes back for every request. Its timing comes in ``engine_kwargs`` (``seconds``, ``slots``).
    """

    def __init__(self, model, engine_kwargs, max_tiles, min_tiles, max_in_flight):
        import threading

        self.seconds, self.slots = float(engine_kwargs["seconds"]), threading.Semaphore(int(engine_kwargs["slots"]))

    def ready(self):
        return True

    def chat(self, encoded_images, requests, max_tokens):
        from concurrent.futures import ThreadPoolExecutor

        def answer(_):
            with self.slots:
                time.sleep(self.seconds)
            return {"text": "A cat sits on a sofa.", "finish_reason": "stop", "prompt_tokens": 1, "cached_tokens": 0}

        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(answer, requests))


class FakeClock:
    """A lease's clock (``sculpt.io.lease.Lease(clock=...)``) that moves only when the test advances it, so that what
    a test shows does not hang on how fast a loaded machine runs its threads.

    ``monotonic`` starts at 0 and ``time`` at the wall clock's time at creation, and both move together; ``wait``
    returns once this clock has reached its end (or the event is set). ``advance`` moves the time, then waits (in
    real time, up to ``SETTLE_SECONDS``) until each thread that waits on this clock waits again for a later time or
    has ended: what the moment woke has been done by then.
    """

    SETTLE_SECONDS = 60.0  # only a thread that never waits again costs this much: then the test fails

    def __init__(self):
        self.now, self.start = 0.0, time.time()
        self.changed = threading.Condition()
        self.waiting: dict[threading.Thread, tuple[float, threading.Event]] = {}  # thread -> (its end, its event)
        self.threads: set[threading.Thread] = set()  # every thread that waited on this clock, or a test named

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.start + self.now

    def wait(self, event: threading.Event, seconds: float) -> bool:
        me = threading.current_thread()
        with self.changed:
            self.threads.add(me)
            self.waiting[me] = (self.now + seconds, event)
            self.changed.notify_all()
            try:
                while not event.is_set() and self.now < self.waiting[me][0]:
                    self.changed.wait(0.01)  # Event.set() tells this condition nothing: look again soon
            finally:
                del self.waiting[me]
                self.changed.notify_all()
        return event.is_set()

    def _settled(self, thread: threading.Thread) -> bool:
        if thread is threading.current_thread() or not thread.is_alive():
            return True
        if thread not in self.waiting:
            return False  # running (or about to wait for the first time)
        end, event = self.waiting[thread]
        return self.now < end and not event.is_set()

    def settle(self, *threads: threading.Thread) -> None:
        """Wait until ``threads`` and every thread that waited on this clock wait for a later time, or have ended."""
        deadline = time.monotonic() + self.SETTLE_SECONDS
        with self.changed:
            self.threads.update(threads)
            while not all(self._settled(thread) for thread in self.threads):
                assert time.monotonic() < deadline, f"threads still running after {self.SETTLE_SECONDS} s"
                self.changed.wait(0.01)

    def advance(self, seconds: float) -> None:
        with self.changed:
            self.now += seconds
            self.changed.notify_all()
        self.settle()

    def advance_until(self, done, step: float, within: float) -> None:
        """Advance ``step`` at a time until ``done()``; fail once more than ``within`` of this clock's time passed."""
        end = self.now + within
        while not done():
            assert self.now < end, f"not done within {within} s"
            self.advance(step)


# --- stand-ins for the VLM engine (engine_class=) and for stages, in tests/test_vlm_stages.py: here, not there, so
# that the Ray workers that unpickle them import this light module, not a test module that imports vLLM ---

class TrustsItsMasks(Stage):
    """Stands in for the verify stage: the keep rule judges each pair with its own mask as the verifier's (IoU 1) and
    no margin (the random tiny SAM2's masks overlap each other ~0.95), so that the text checks and a reasoning pair's
    target decide (the random tiny EVF-SAM2 keeps nothing)."""

    name = "verify"

    def process(self, rows):
        from actors.verify import Verifier
        from sculpt.annotation import verify

        params = {**Verifier.defaults, "margin": 0.0}
        for row in rows:
            objects = row["objects"] or []
            for i in verify.split(objects)[0]:
                verify.judge(objects, i, objects[i]["mask"], params)


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


class StartsAsPlanned(DiesOnPoison):
    """Stands in for VLMEngine as replica R of the pool. Each start leaves a file ``start-R-<n>`` in ``model``, and
    fails with a transient fault (as a GPU still held by a dying engine would make it) where word n of
    ``model``/plan-R is "fail" (its last word holds for later starts). While ``model``/die-R exists, a chat removes
    it and ends the process, the way a dead engine core ends VLMEngine's."""

    def __init__(self, model, *args):
        import os

        import ray

        from sculpt import errors

        super().__init__(model, *args)
        self.model, self.replica = model, ray.get_runtime_context().get_actor_name().rsplit("-", 1)[1]
        starts = sum(name.startswith(f"start-{self.replica}-") for name in os.listdir(model))
        open(os.path.join(model, f"start-{self.replica}-{starts}"), "w").close()
        plan = os.path.join(model, f"plan-{self.replica}")
        words = open(plan).read().split() if os.path.exists(plan) else ["ok"]
        if words[min(starts, len(words) - 1)] == "fail":
            raise errors.TransientError(f"injected: engine {self.replica} cannot start (start {starts})")

    def chat(self, encoded_images, requests, max_tokens):
        import os

        die = os.path.join(self.model, f"die-{self.replica}")
        if os.path.exists(die):
            os.remove(die)
            os._exit(1)
        return super().chat(encoded_images, requests, max_tokens)


class LoadsOnSecondTry(Stage):
    """A stage whose setup fails with CUDA out of memory the first time in each process (a model load beside a
    process still letting go of the GPU); each try leaves a file ``setup-<pid>-<n>`` in ``log_dir``."""

    name = "loads"

    def setup(self):
        import os

        import torch

        pid = os.getpid()
        tries = sum(name.startswith(f"setup-{pid}-") for name in os.listdir(self.params["log_dir"]))
        open(os.path.join(self.params["log_dir"], f"setup-{pid}-{tries}"), "w").close()
        if not tries:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected at load)")

    def process(self, rows):
        for row in rows:
            row["caption"] = "loaded"
