"""The one fault policy (sculpt/errors.py): the classifier's table, the retry helpers, the job-level line."""

import errno
import tarfile

import pytest

from sculpt import errors
from sculpt.errors import BREAKS_DEVICE, JOB, PERMANENT, TRANSIENT


def named(name, base=Exception):
    """An exception class of another library's name (torch, ray, vllm), without importing it."""
    return type(name, (base,), {})


RayActorError = named("RayActorError")
OUT, S3_OUT, SHARD, S3_SHARD = "/data/out", "s3://bucket/out", "/data/sa_000001.tar", "s3://bucket/sa_000001.tar"

# (fault, the store whose call raised it, whether that call read a shard, its kind)
CASES = [
    # sculpt's own job-level errors, wherever they are raised
    (errors.BadInput("no shards found"), None, False, JOB),
    (errors.StoreFailure("no space left on the output's disk"), OUT, False, JOB),
    # raised while processing an image
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), None, False, TRANSIENT),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), None, False, BREAKS_DEVICE),
    (RuntimeError("CUDA error: device-side assert triggered"), None, False, BREAKS_DEVICE),
    (RuntimeError("CUDA error: no kernel image is available for execution on the device"), None, False, PERMANENT),
    (named("OutOfMemoryError", RuntimeError)("out of memory"), None, False, TRANSIENT),
    (named("EngineDeadError")("EngineCore encountered an issue"), None, False, TRANSIENT),
    (named("ActorDiedError", RayActorError)("The actor died"), None, False, TRANSIENT),
    (errors.TransientError("the remote service is down"), None, False, TRANSIENT),
    (ConnectionResetError(104, "Connection reset by peer"), None, False, TRANSIENT),
    (named("APIConnectionError", named("OpenAIError"))("Connection error."), None, False, TRANSIENT),  # vlm.endpoint
    # retried below; not a broken device here even if the engine's was (another process)
    (errors.SpentRetries("the VLM engine died on this call (illegal memory access)"), None, False, TRANSIENT),
    (OSError("image file is truncated (3 bytes not processed)"), None, False, PERMANENT),  # PIL: about the image
    (ValueError("unusable referring expression"), None, False, PERMANENT),
    (RuntimeError("unknown error"), None, False, PERMANENT),
    # raised by a call to a store: writing the output
    (OSError(errno.ENOSPC, "No space left on device"), OUT, False, JOB),
    (OSError(errno.ENOSPC, "No space left on device"), S3_OUT, False, TRANSIENT),  # a worker's staging disk
    (OSError(errno.EIO, "Input/output error"), OUT, False, TRANSIENT),
    (FileNotFoundError(errno.ENOENT, "a part file is gone"), OUT, False, TRANSIENT),
    (OSError("AWS Error SLOW_DOWN during PutObject operation: reduce your request rate"), S3_OUT, False, TRANSIENT),
    (named("S3UploadFailedError", named("Boto3Error"))("Failed to upload: SlowDown"), S3_OUT, False, TRANSIENT),
    (named("EndpointConnectionError", named("BotoCoreError"))("Could not connect"), S3_OUT, False, TRANSIENT),
    (named("WorkerCrashedError")("The worker died"), OUT, False, TRANSIENT),  # a commit's worker, past Ray's retries
    (ValueError("a bug in a commit"), OUT, False, PERMANENT),
    # raised by a call to a store that reads a shard
    (ConnectionResetError(104, "Connection reset by peer"), SHARD, True, TRANSIENT),
    (OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curl code 56"), S3_SHARD, True, TRANSIENT),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), SHARD, True, PERMANENT),
    (PermissionError(errno.EACCES, "Permission denied"), S3_SHARD, True, PERMANENT),
    (tarfile.ReadError("unexpected end of data"), SHARD, True, PERMANENT),
    (EOFError("Compressed file ended before the end-of-stream marker was reached"), SHARD, True, PERMANENT),
]


@pytest.mark.parametrize("fault, store, reading, kind", CASES, ids=lambda v: errors.describe(v)[:60]
                         if isinstance(v, BaseException) else None)
def test_the_table_gives_each_fault_its_kind(fault, store, reading, kind):
    assert errors.classify(fault, store, reading) is kind
    assert errors.rule(fault, store, reading).why


def test_every_row_of_the_table_decides_a_case_above():
    used = {errors.rule(fault, store, reading) for fault, store, reading, _ in CASES}
    assert [row.why for row in errors.RULES if row not in used] == []


@pytest.mark.parametrize("fault, uri, store_fault", [
    (OSError(errno.EIO, "Input/output error"), OUT, True),
    (ConnectionResetError(104, "reset"), S3_OUT, True),
    (OSError(errno.ENOSPC, "No space left on device"), OUT, False),  # the job stops: every unit would fail
    (OSError(errno.ENOSPC, "No space left on device"), S3_OUT, True),  # another worker may have room
    (named("ClientError", named("BotoCoreError"))("AccessDenied"), S3_OUT, True),
    (ValueError("a bug"), OUT, False),
    (errors.StoreFailure("no space left on the output's disk"), OUT, False),
])
def test_is_store_fault_keeps_its_meaning(fault, uri, store_fault):
    from sculpt.io.storage import is_store_fault

    assert is_store_fault(fault, uri) is store_fault


def test_retried_here_is_a_transient_fault_that_neither_broke_the_device_nor_spent_its_retries():
    assert errors.retried_here(RuntimeError("CUDA out of memory"))
    assert not errors.retried_here(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not errors.retried_here(errors.SpentRetries("retried below"))
    assert not errors.retried_here(ValueError("bad json"))
    assert errors.retried_here(OSError(errno.EIO, "Input/output error"), SHARD, reading=True)
    assert not errors.retried_here(FileNotFoundError(errno.ENOENT, "gone"), SHARD, reading=True)
    # beside a store's calls: not the store's fault, not retried as one (a Ray actor the reader called)
    assert not errors.retried_here(RayActorError("the gate died"), SHARD, reading=True)


@pytest.mark.parametrize("fault", [ValueError("a bug"), OSError(errno.ENOSPC, "No space left on device"),
                                   OSError("AWS Error NETWORK_CONNECTION"), FileNotFoundError("missing"),
                                   KeyError("x"), RuntimeError("CUDA out of memory")])
def test_job_error_keeps_the_traceback_of_anything_but_sculpts_own_job_errors(fault):
    assert errors.job_error(fault) is None


def test_job_error_is_the_line_of_sculpts_job_errors():
    from sculpt.config import ConfigError
    from sculpt.io.lease import OutputBusy
    from sculpt.outputs.store import IncompatibleOutput
    from sculpt.outputs.units import ErrorBudgetExceeded

    for cls in (errors.JobError, errors.BadInput, errors.ClusterTooSmall, errors.StoreFailure, ConfigError, OutputBusy,
                IncompatibleOutput, ErrorBudgetExceeded):
        assert errors.job_error(cls("the cause; the fix")) == "the cause; the fix", cls


def test_a_store_fault_where_no_unit_can_be_left_pending_becomes_a_job_error_with_its_line():
    full = errors.job_failure(OSError(errno.ENOSPC, "No space left on device"), OUT)
    assert isinstance(full, errors.StoreFailure) and isinstance(full, OSError) and full.errno == errno.ENOSPC
    assert errors.job_error(full).startswith("no space left on the output's disk ([Errno 28] No space left on device)")
    refused = errors.job_failure(OSError("AWS Error NETWORK_CONNECTION during HeadObject: curl code 7"), S3_OUT)
    assert errors.job_error(refused).startswith("S3 is unreachable or refused the request (OSError: AWS Error")
    assert "check s3.endpoint" in errors.job_error(refused)
    denied = errors.job_failure(PermissionError(errno.EACCES, "Permission denied"), OUT)
    assert errors.job_error(denied) == ("PermissionError: [Errno 13] Permission denied; check the path and its "
                                        "permissions")
    for other in (ValueError("a bug"), errors.BadInput("no shards"), named("WorkerCrashedError")("died")):
        assert errors.job_failure(other, OUT) is other

    with pytest.raises(errors.StoreFailure, match="no space left on the output's disk") as caught:
        with errors.at_job_level(OUT):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(ValueError, match="a bug"):
        with errors.at_job_level(OUT):
            raise ValueError("a bug")


def test_retrying_retries_transient_faults_only_and_raises_the_last():
    calls = []

    def flaky(faults):
        def call():
            calls.append(1)
            if len(calls) <= len(faults):
                raise faults[len(calls) - 1]
            return "done"
        return call

    retries = []
    resets = [ConnectionResetError(104, "reset")] * 2
    assert errors.retrying(flaky(resets), 3, 0, lambda k, exc: retries.append(k)) == "done"
    assert len(calls) == 3 and retries == [0, 1]
    for faults, tries in [([ConnectionResetError(104, "reset")] * 5, 3), ([ValueError("bad json")], 1),
                          ([errors.SpentRetries("retried below")], 1),
                          ([RuntimeError("CUDA error: an illegal memory access was encountered")], 1)]:
        calls.clear()
        with pytest.raises(type(faults[0])):
            errors.retrying(flaky(faults), 3, 0)
        assert len(calls) == tries, faults


def test_retrying_stream_starts_the_stream_again_where_it_broke():
    done, opens, broke = [], [], set()

    def stream():
        opens.append(len(done))
        for i in range(len(done), 5):
            if i in (1, 3) and i not in broke:  # the stream breaks once before items 1 and 3
                broke.add(i)
                raise ConnectionResetError(104, "reset")
            done.append(i)
            yield i
        return "to the end"

    ended = []

    def reader():
        ended.append((yield from errors.retrying_stream(stream, 3, 0, store=SHARD, reading=True)))

    assert list(reader()) == [0, 1, 2, 3, 4] and opens == [0, 1, 3] and ended == ["to the end"]

    def missing():
        opens.append("open")
        raise FileNotFoundError(errno.ENOENT, "gone")
        yield

    opens.clear()
    with pytest.raises(FileNotFoundError):
        list(errors.retrying_stream(missing, 3, 0, store=SHARD, reading=True))
    assert opens == ["open"]


def test_an_input_without_usable_shards_is_a_job_error_with_its_fix(tmp_path):
    from sculpt import config
    from sculpt.engine.planning import list_shards

    def shards_of(*patterns):
        return list_shards(config.load(None, [f"input.shards={list(map(str, patterns))}"]))

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "sa_000001.tar").write_bytes(b"")
    (tmp_path / "b" / "sa_000001.tar.gz").write_bytes(b"")
    for patterns, says in [((tmp_path / "nope",), "no such input"), ((tmp_path / "empty*",), "no shards"),
                           ((tmp_path / "a", tmp_path / "b"), "two shards would write the same output unit")]:
        with pytest.raises(errors.BadInput, match=says) as caught:
            shards_of(*patterns)
        assert "check input.shards" in errors.job_error(caught.value) or "rename one" in errors.job_error(caught.value)
    assert shards_of(tmp_path / "a") == [str(tmp_path / "a" / "sa_000001.tar")]


def test_a_fault_that_does_not_pickle_crosses_a_task_boundary_with_its_line_and_kind():
    import io
    import pickle

    from botocore.exceptions import ConnectionClosedError

    dropped = ConnectionClosedError(endpoint_url="http://127.0.0.1:9", request=io.BufferedReader(io.BytesIO(b"")))
    with pytest.raises(TypeError):
        pickle.dumps(dropped)
    with pytest.raises(errors.Relayed) as caught:
        with errors.relayed("s3://bucket/out"):
            raise dropped
    relayed = pickle.loads(pickle.dumps(caught.value))
    assert errors.describe(relayed).startswith("ConnectionClosedError: Connection was closed")
    assert errors.classify(relayed) is errors.TRANSIENT and errors.rule(relayed).job_line == errors.S3_REFUSED
    with pytest.raises(ValueError):  # one that pickles crosses as it is
        with errors.relayed("s3://bucket/out"):
            raise ValueError("bad row")
