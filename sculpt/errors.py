"""The one fault policy: what kind a fault is (``classify``), how it is retried (``retrying``), and the one line a
job-level failure ends with (``job_error``).

A fault is one of four kinds, decided by one table, ``RULES``, read top to bottom (the first row that matches wins):

- transient: says nothing about the image — a connection reset, S3 throttling or a 5xx, a dead vLLM engine or an
  unreachable VLM server, a CUDA out-of-memory or device error, a dead actor. Retried (``retrying``); one that
  outlasts its retries leaves the image's unit uncommitted (pending for the next run), never written as a result.
- breaks-device: a device fault after which the process's CUDA context stays unusable. Not retried in the process:
  the stage's actor restarts (``sculpt.stage.StageActor``).
- permanent: about the image (a corrupt JPEG, bad JSON, an unusable model answer): its error row. Anything the
  table does not name is permanent.
- job-level: no retry or other unit can get past it (a full output disk, sculpt's own ``JobError``s): the job
  stops with one ``sculpt: error:`` line (``job_error``).

Where a fault was raised matters for some rows: ``classify(exc, store)`` is told the store (a local path or an
s3:// URI) whose call raised it, and ``reading=True`` when that call read a shard. An I/O error while processing an
image (PIL's truncated file) is about the image; the same class raised by a store is the store's fault.

The README's "Faults" table gives, for each kind, what happens and the worst-case number of tries.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import time
from dataclasses import dataclass


class Kind(enum.Enum):
    TRANSIENT = "transient"
    BREAKS_DEVICE = "breaks-device"
    PERMANENT = "permanent"
    JOB = "job-level"


TRANSIENT, BREAKS_DEVICE, PERMANENT, JOB = Kind.TRANSIENT, Kind.BREAKS_DEVICE, Kind.PERMANENT, Kind.JOB


@dataclass(frozen=True)
class Rule:
    """One row of the table. It matches a fault when every criterion it gives holds; each criterion holds when any
    of its values does. Class names are matched anywhere in the fault's class hierarchy, so that this module
    imports no torch, ray, vllm or boto3."""

    kind: Kind
    why: str
    classes: tuple[str, ...] = ()  # exception class names
    errnos: tuple[int, ...] = ()  # OSError.errno values
    messages: tuple[str, ...] = ()  # fragments of str(exc)
    # where it was raised: "anywhere"; "store": by a call to a store (classify's ``store``); "local" or "s3": to
    # such a store; "reading": by the shard reader's reads of one
    where: str = "anywhere"
    # the one line a fault of this row ends a job with where no unit can be left pending (``job_failure``); {exc}
    # is the fault's message, {what} its class and first line
    job_line: str | None = None

    def matches(self, exc: BaseException, store: str | None, reading: bool) -> bool:
        if not self._raised_where(store, reading):
            return False
        if self.classes and not any(cls.__name__ in self.classes for cls in type(exc).__mro__):
            return False
        if self.errnos and getattr(exc, "errno", None) not in self.errnos:
            return False
        return not self.messages or any(text in str(exc) for text in self.messages)

    def _raised_where(self, store: str | None, reading: bool) -> bool:
        if self.where == "anywhere":
            return True
        if store is None:
            return False
        s3 = store.startswith("s3://")
        return {"store": True, "reading": reading, "s3": s3, "local": not s3}[self.where]


# Device faults after which the process's CUDA context stays broken: every later call in it fails the same way.
BROKEN_DEVICE_MESSAGES = ("illegal memory access", "device-side assert", "unspecified launch failure",
                          "misaligned address", "illegal instruction", "uncorrectable ECC error", "launch timed out",
                          "hardware stack error", "invalid program counter", "not supported on global/shared address",
                          "CUDA error: unknown error")
# RuntimeError messages of device faults (older torch raises CUDA errors as plain RuntimeError).
TRANSIENT_MESSAGES = ("CUDA out of memory", "CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "NCCL error",
                      "device-side assert", "HIP out of memory")
# CUDA errors of the installation, not of a batch.
SETUP_MESSAGES = ("no kernel image is available", "driver version is insufficient")
# torch.OutOfMemoryError (torch.cuda.OutOfMemoryError), torch.AcceleratorError, Ray's actor and object faults,
# vLLM's engine death.
TRANSIENT_CLASSES = ("OutOfMemoryError", "AcceleratorError",
                     "RayActorError", "ActorDiedError", "ActorUnavailableError", "ObjectLostError", "OwnerDiedError",
                     "NodeDiedError", "WorkerCrashedError", "GetTimeoutError",
                     "EngineDeadError", "EngineGenerateError")
# An OpenAI-compatible VLM server's faults (vlm.endpoint), as the openai client raises them past its own retries:
# unreachable or its connection cut, a timeout, 429, 5xx. Any other answer (400: a request it cannot serve) is about
# the image.
ENDPOINT_CLASSES = ("APIConnectionError", "APITimeoutError", "RateLimitError", "InternalServerError")
MISSING_OR_FORBIDDEN = ("FileNotFoundError", "PermissionError", "IsADirectoryError", "NotADirectoryError")
BOTO_ERRORS = ("Boto3Error", "BotoCoreError", "ClientError")  # boto3's own errors, past its retries

DISK_FULL = "no space left on the output's disk ({exc}); free space or choose another output path, then rerun"
S3_REFUSED = ("S3 is unreachable or refused the request ({what}); check s3.endpoint (with its http:// or https://), "
              "the credentials (AWS_* variables or the node's IAM role) and the bucket")
PATH_REFUSED = "{what}; check the path and its permissions"

RULES: tuple[Rule, ...] = (
    Rule(JOB, "sculpt's own job-level failure (a config value, an output held or refused, the error budget spent, "
         "input or cluster unusable): it names the cause and the fix", classes=("JobError",)),
    # faults of a store (local or S3), past its client's own retries (s3.retry_attempts)
    Rule(PERMANENT, "a shard missing or forbidden: opening it again gets no further. Read from its start it is the "
         "shard's error row; a shard that was readable before (a resume, a redo, a split chunk, images in) leaves "
         "its chunk pending instead", classes=MISSING_OR_FORBIDDEN, where="reading"),
    Rule(PERMANENT, "the input file itself ends early or is corrupt (a tar, or a Parquet page or footer read whole "
         "but undecodable): the images read are kept, the rest are error rows",
         classes=("TarError", "EOFError", "Undecodable"), where="reading"),
    Rule(JOB, "the output's local disk is full: every unit would fail the same way", errnos=(errno.ENOSPC,),
         where="local", job_line=DISK_FULL),
    Rule(TRANSIENT, "a worker's disk full while it stages an S3 upload: another worker may have room",
         errnos=(errno.ENOSPC,), where="s3", job_line=DISK_FULL),
    Rule(TRANSIENT, "S3 past the client's retries (pyarrow raises OSError): throttling, 5xx, a cut-off read",
         classes=("OSError",), where="s3", job_line=S3_REFUSED),
    Rule(TRANSIENT, "S3 past boto3's retries", classes=BOTO_ERRORS, where="store", job_line=S3_REFUSED),
    Rule(TRANSIENT, "a local or mounted store's I/O error (a missing part file when writing included): the unit "
         "stays pending", classes=("OSError",), where="local", job_line=PATH_REFUSED),
    # faults raised anywhere
    Rule(PERMANENT, "a CUDA error of the installation, not of a batch: no retry or restart cures it, so the error "
         "budget stops the job with its message instead of every unit staying pending", messages=SETUP_MESSAGES),
    Rule(TRANSIENT, "retried below already (a VLM call Ray resent to the restarted engine, or vLLM's retryable "
         "error resent): not retried again here, its images are tried once each", classes=("SpentRetries",)),
    Rule(BREAKS_DEVICE, "the process's CUDA context is unusable: every later call in it fails the same way, so the "
         "actor restarts", classes=("RuntimeError",), messages=BROKEN_DEVICE_MESSAGES),
    Rule(TRANSIENT, "declared transient (TransientError: a custom stage's remote service down), or the network",
         classes=("TransientError", "ConnectionError", "TimeoutError")),
    Rule(TRANSIENT, "CUDA out of memory or a device error, a Ray actor, object or node lost, vLLM's engine dead",
         classes=TRANSIENT_CLASSES),
    Rule(TRANSIENT, "a VLM server (vlm.endpoint) unreachable, timing out, rate-limiting or failing (5xx), past its "
         "client's retries", classes=ENDPOINT_CLASSES),
    Rule(TRANSIENT, "a device fault that older torch raises as a plain RuntimeError", classes=("RuntimeError",),
         messages=TRANSIENT_MESSAGES),
    Rule(PERMANENT, "anything else raised while processing an image is about that image (a corrupt JPEG, bad "
         "JSON, an unusable model answer): its error row"),
)


def rule(exc: BaseException, store: str | None = None, reading: bool = False) -> Rule:
    """The row of ``RULES`` that decides ``exc``: raised by a call to ``store`` (None: while processing an image),
    one that read a shard if ``reading``; a ``Relayed`` fault's own, decided where it was raised."""
    if isinstance(exc, Relayed):
        return exc.rule
    return next(r for r in RULES if r.matches(exc, store, reading))


def classify(exc: BaseException, store: str | None = None, reading: bool = False) -> Kind:
    return rule(exc, store, reading).kind


class JobError(Exception):
    """A failure of the whole job that sculpt itself names (bad config, output held or refused, error budget spent):
    it ends the job with one ``sculpt: error:`` line, its message, instead of a traceback."""


class BadInput(JobError):
    """The job's input as a whole cannot be used: no shards found, two shards that would write one output unit."""


class ClusterTooSmall(JobError):
    """The job cannot all be placed on a cluster of fixed size."""


class StoreFailure(JobError, OSError):
    """A store's fault where no unit can be left pending (a full output disk, an S3 that is unreachable or refuses
    the request, an output path that cannot be written): ``job_failure`` makes it from the fault, with its row's
    line. An OSError still, with the fault's errno."""


class Undecodable(ValueError):
    """An input file's bytes, all read from its store, that its format cannot decode (a corrupt Parquet page or
    footer; pyarrow raises OSError for these as for the store's own faults): about the data, never the store."""


class TransientError(RuntimeError):
    """A fault a retry may cure. Raise it from a custom stage for faults of your own (a remote service down)."""


class SpentRetries(TransientError):
    """A transient fault whose retries were made below (a VLM engine call that Ray resent to the restarted engine):
    not retried again as a batch, only its images one by one, and an image it outlasts waits for the next run."""


class Relayed(Exception):
    """A fault that cannot cross a Ray task's boundary as it is (botocore's ``ConnectionClosedError`` holds an open
    stream, and does not pickle): its line, and its row of ``RULES`` as decided where it was raised."""

    def __init__(self, line: str, rule: Rule):
        super().__init__(line)
        self.rule = rule

    def __reduce__(self):
        return Relayed, (str(self), self.rule)


@contextlib.contextmanager
def relayed(store: str):
    """In a Ray task that calls ``store``: a fault raised inside that would not reach the caller as it is (it does
    not pickle) is raised as a ``Relayed`` carrying its line and its kind."""
    import pickle

    try:
        yield
    except Exception as exc:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            raise Relayed(describe(exc), rule(exc, store)) from None
        raise


def is_transient(exc: BaseException, store: str | None = None) -> bool:
    """Not data: a fault that a retry, a restart or the next run may cure (transient or breaks-device)."""
    return classify(exc, store) in (TRANSIENT, BREAKS_DEVICE)


def breaks_device(exc: BaseException) -> bool:
    """A transient fault that only a new process recovers from."""
    return classify(exc) is BREAKS_DEVICE


def retried_here(exc: BaseException, store: str | None = None, reading: bool = False) -> bool:
    """A transient fault that a retry in this process may cure: not one that broke the device, nor one whose
    retries were spent below. With ``store``, a transient fault of that store only (a row of the store's), not one
    raised beside its calls (a Ray actor's that the caller called too)."""
    found = rule(exc, store, reading)
    return (found.kind is TRANSIENT and not isinstance(exc, SpentRetries)
            and (store is None or found.where != "anywhere"))


def describe(exc: BaseException) -> str:
    """One line for logs and error rows: the class and the first line of the message."""
    if isinstance(exc, Relayed):
        return str(exc)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def release_device_memory() -> None:
    """After an out-of-memory error: give cached CUDA blocks back before the retry (no-op without CUDA)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def retrying(call, attempts: int, backoff: float, on_retry=None, store: str | None = None, reading: bool = False):
    """``call()``, tried up to ``attempts`` times in all while it raises a fault ``retried_here`` (with ``store``
    and ``reading``: a transient fault of that store), waiting backoff·2^k before the k-th retry.

    Any other fault is raised at once; the last retried one when the attempts run out."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if not _another_try(exc, attempt, attempts, backoff, on_retry, store, reading):
                raise


def retrying_stream(stream, attempts: int, backoff: float, on_retry=None, store: str | None = None,
                    reading: bool = False):
    """``yield from stream()`` as ``retrying`` calls: after a fault it retries, ``stream()`` is started again, and
    is expected to go on from where the last one broke (it keeps its own position); returns what it returns.

    The items yielded before a fault stay yielded: a stream that is not resumable must not use this."""
    for attempt in range(attempts):
        try:
            return (yield from stream())
        except Exception as exc:
            if not _another_try(exc, attempt, attempts, backoff, on_retry, store, reading):
                raise


def _another_try(exc, attempt, attempts, backoff, on_retry, store, reading) -> bool:
    """Whether ``exc`` gets another try; if so, once the wait before it is over."""
    if attempt == attempts - 1 or not retried_here(exc, store, reading):
        return False
    release_device_memory()
    if on_retry:
        on_retry(attempt, exc)
    time.sleep(backoff * 2**attempt)
    return True


def job_failure(exc: BaseException, store: str, doing: str | None = None) -> BaseException:
    """What a fault raised by a call to ``store`` becomes where no unit can be left pending (listing the input,
    taking the output's lease, preparing it, a commit's full disk): a ``StoreFailure`` with the line of its row in
    ``RULES`` — a full disk, S3 unreachable or refusing, a local path that cannot be used — after what the job was
    ``doing`` there ("writing the job file on s3://bucket/out failed: ..."). Any other exception (sculpt's own
    JobErrors, bugs) is returned as it is."""
    line = rule(exc, store).job_line
    if line is None or isinstance(exc, JobError):
        return exc
    line = line.format(exc=exc, what=describe(exc))
    failure = StoreFailure(f"{doing} on {store} failed: {line}" if doing else line)
    failure.errno = getattr(exc, "errno", None)
    return failure


@contextlib.contextmanager
def at_job_level(store: str, unwrap: bool = False, doing: str | None = None):
    """Raise what ``job_failure`` makes of a fault of ``store`` raised inside (from the fault), naming what the job
    was ``doing``; ``unwrap``: of the fault a Ray task raised (its ``cause``), too."""
    try:
        yield
    except Exception as exc:
        fault = getattr(exc, "cause", exc) if unwrap else exc
        failure = job_failure(fault, store, doing)
        if failure is fault:
            raise
        raise failure from exc


def job_error(exc: BaseException) -> str | None:
    """The one line (cause, then the fix) that ends a job failing with one of sculpt's own job-level errors
    (``JobError``); None for any other exception, which keeps its traceback."""
    return str(exc) if isinstance(exc, JobError) else None
