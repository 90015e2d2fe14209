"""Transient versus permanent faults: the one rule that decides what is retried and what becomes data.

Transient faults say nothing about the image: a connection reset, S3 throttling or a 5xx, a dead vLLM engine, a
CUDA out-of-memory or device error, a dead actor. They are retried (``retrying``); one that outlasts its retries
leaves the image's unit uncommitted (pending for the next run), never written as a result.

Everything else raised while processing an image is permanent for that image (a corrupt JPEG, bad JSON, an
unusable model answer) and becomes its error row.
"""

from __future__ import annotations

import time

# Exception classes, matched by name anywhere in the class hierarchy, so that this module imports no torch, ray
# or vllm: torch.OutOfMemoryError (torch.cuda.OutOfMemoryError), Ray's actor and object faults, vLLM's engine death.
TRANSIENT_CLASSES = {
    "OutOfMemoryError", "AcceleratorError",
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "ObjectLostError", "OwnerDiedError",
    "NodeDiedError", "WorkerCrashedError", "GetTimeoutError",
    "EngineDeadError", "EngineGenerateError",
}
# RuntimeError messages of device faults (older torch raises CUDA errors as plain RuntimeError).
TRANSIENT_MESSAGES = ("CUDA out of memory", "CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "NCCL error",
                      "device-side assert", "HIP out of memory")


# Device faults after which the process's CUDA context stays broken: every later call in it fails the same way, so
# they are not retried in the process (sculpt.stage.StageActor restarts its actor instead).
BROKEN_DEVICE_MESSAGES = ("illegal memory access", "device-side assert", "unspecified launch failure",
                          "misaligned address", "illegal instruction", "uncorrectable ECC error", "launch timed out",
                          "hardware stack error", "invalid program counter", "not supported on global/shared address",
                          "CUDA error: unknown error")
# CUDA errors of the installation, not of a batch: no retry or restart cures them, so they are permanent (the
# error budget then stops the job with the message, instead of every unit staying pending).
SETUP_MESSAGES = ("no kernel image is available", "driver version is insufficient")


class JobError(Exception):
    """A failure of the whole job that sculpt itself names (bad config, output held or refused, error budget spent):
    it ends the job with one ``sculpt: error:`` line, its message, instead of a traceback."""


class TransientError(RuntimeError):
    """A fault a retry may cure. Raise it from a custom stage for faults of your own (a remote service down)."""


class SpentRetries(TransientError):
    """A transient fault whose retries were made below (a VLM engine call that Ray resent to the restarted engine):
    not retried again as a batch, only its images one by one, and an image it outlasts waits for the next run."""


def is_transient(exc: BaseException) -> bool:
    if any(text in str(exc) for text in SETUP_MESSAGES):
        return False
    if isinstance(exc, (TransientError, ConnectionError, TimeoutError)):
        return True
    if any(cls.__name__ in TRANSIENT_CLASSES for cls in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in TRANSIENT_MESSAGES)


def breaks_device(exc: BaseException) -> bool:
    """A transient fault that only a new process recovers from (BROKEN_DEVICE_MESSAGES)."""
    return is_transient(exc) and any(text in str(exc) for text in BROKEN_DEVICE_MESSAGES)


def retried_here(exc: BaseException) -> bool:
    """A transient fault that a retry in this process may cure: not one that broke the device, nor one whose
    retries were spent below."""
    return is_transient(exc) and not breaks_device(exc) and not isinstance(exc, SpentRetries)


def describe(exc: BaseException) -> str:
    """One line for logs and error rows: the class and the first line of the message."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def release_device_memory() -> None:
    """After an out-of-memory error: give cached CUDA blocks back before the retry (no-op without CUDA)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def retrying(call, attempts: int, backoff: float, on_retry=None):
    """``call()``, retried on transient faults up to ``attempts`` times in all, waiting backoff·2^k between tries.

    A permanent fault, one that breaks the device or one whose retries are spent is raised at once; the last
    transient one is raised when the attempts run out."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as exc:
            if not retried_here(exc) or attempt == attempts - 1:
                raise
            release_device_memory()
            if on_retry:
                on_retry(attempt, exc)
            time.sleep(backoff * 2**attempt)


def job_error(exc: BaseException) -> str | None:
    """The one line (cause, then the fix) for a failure that ends a whole job, or None for an unexpected one."""
    import errno

    import yaml

    if isinstance(exc, (JobError, FileNotFoundError)):
        return str(exc)
    if isinstance(exc, yaml.YAMLError):
        return f"the config file is not valid YAML: {' '.join(str(exc).split())}"
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return f"no space left on the output's disk ({exc}); free space or choose another output path, then rerun"
        if "AWS Error" in str(exc) or "S3" in str(exc) or "curl" in str(exc).lower():
            return (f"S3 is unreachable or refused the request ({describe(exc)}); check s3.endpoint (with its "
                    "http:// or https://), the credentials (AWS_* variables or the node's IAM role) and the bucket")
        return f"{describe(exc)}; check the path and its permissions"
    if isinstance(exc, ValueError):
        return str(exc)
    return None
