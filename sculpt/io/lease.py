"""One job at a time on an output: a lease file ``OUT/_lease.json`` that the running job renews.

A job takes the lease before it touches the output (before it clears a killed run's temporary files and
unfinished uploads, which would otherwise be another live job's) and gives it back when it ends. A second job
finds the lease held and is refused with a message that says who holds it. A lease whose holder stopped renewing
(``ttl_seconds``) is taken over, as is one held by a dead process on this same machine, at once: a driver killed
and rerun resumes without waiting. Taking and renewing are conditional writes — S3's If-None-Match / If-Match,
an exclusive create or a locked compare-and-write locally — so two jobs racing for one output cannot both win.
The local lock (``_locked``) is a file beside the lease that exists only while a job holds it: a finished job
leaves nothing but its output.
A job that finds at a renewal that another took the output over (it stalled past the ttl) stops at its next
receipt (``check``). A job whose renewals fail (the store unreachable) starts no commit once half the ttl has
passed since its last renewal, until one lands: another job can take a lease over only after the whole ttl, so
the commits a job starts have half the ttl to land before anyone can take the output over; each also looks
at the lease once more before it writes (``confirm``). The conditional renewal decides: it lands if nobody
took the output over meanwhile, and the job goes on; it is refused if another did, and the job stops, as it
does when renewals keep failing for ``STALL_TTLS`` ttls (lost credentials, say).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid

from sculpt import errors
from sculpt.io import storage

LEASE_FILE = "_lease.json"
TTL_SECONDS = 90.0  # a lease not renewed for this long is free; the holder renews at a third of it
STALL_TTLS = 10  # a job that cannot renew its lease for this many ttls stops (lasting: credentials, permissions)


class OutputBusy(errors.JobError):
    """Another job holds the output, or may: this job can no longer show that it holds it."""


class Clock:
    """A lease's time: ``monotonic`` for its own deadlines (half the ttl, the renewals), ``time`` (the wall clock) for
    the stamps written into the lease file, which other jobs, on other machines, read, and ``wait`` for the pauses
    between renewals and polls. Jobs use this one; tests pass one that moves only when they say (tests/doubles.py)."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)

    @staticmethod
    def wait(event: threading.Event, seconds: float) -> bool:
        """Wait ``seconds``, or until ``event`` is set; whether it is."""
        return event.wait(seconds)


SYSTEM_CLOCK = Clock()


class Lease:
    def __init__(self, out: str, s3: storage.S3Options = storage.S3Options(), ttl_seconds: float = TTL_SECONDS,
                 clock: Clock = SYSTEM_CLOCK):
        self.uri, self.s3, self.ttl, self.clock = lease_uri(out), s3, ttl_seconds, clock
        self.record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self.version = None  # the ETag (S3) or content (local) of our lease file as last written
        self.renewed_at = 0.0  # clock.monotonic() of our last write that landed
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str | None = None  # why this job no longer holds the output, once another job took it over
        self.last_error: str | None = None  # the last renewal's failure

    # -- the conditional writes -----------------------------------------------------------------------------------
    def _read(self) -> tuple[dict | None, str | None]:
        return read_holder(self.uri, self.s3)

    def _write(self, expected: str | None) -> bool:
        """Write our record if the file is still as we last read it (``expected``; None: absent)."""
        # the lease counts from its stamp, not from when the write was answered (S3's retries can take minutes)
        stamped = self.clock.monotonic()
        body = json.dumps({**self.record, "renewed": self.clock.time()})
        if storage.is_s3(self.uri):
            import botocore.exceptions

            client, (bucket, key) = storage.s3_client(self.s3), storage.bucket_key(self.uri)
            condition = {"IfMatch": expected} if expected else {"IfNoneMatch": "*"}
            try:
                self.version = client.put_object(Bucket=bucket, Key=key, Body=body.encode(), **condition)["ETag"]
            except botocore.exceptions.ClientError as exc:
                # NoSuchKey: If-Match on a lease someone deleted (a user, or a job that took over and ended)
                if exc.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    return False
                raise
            self.renewed_at = stamped
            return True
        path = os.path.abspath(self.uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if expected is None:
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "w") as f:
                    f.write(body)
                try:
                    os.link(tmp, path)  # the whole file appears at once, and only where there is none
                except FileExistsError:
                    raise
                except OSError:  # no hard links (FUSE mounts of object stores, some SMB): an exclusive create,
                    # under the lock that a takeover of the file (empty until written) also takes
                    with _locked(path):
                        with open(path, "x") as f:
                            f.write(body)
            except FileExistsError:
                return False
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            # the compare and the write under one lock: two jobs taking over a stale lease at once cannot both win
            with _locked(path):
                if self._read()[1] != expected:
                    return False
                storage.write_atomic(self.uri, body.encode())
        self.version, self.renewed_at = body, stamped
        return True

    # -- the lease ------------------------------------------------------------------------------------------------
    def _free(self, holder: dict) -> bool:
        if self.clock.time() - holder.get("renewed", 0) > self.ttl:
            return True
        if holder.get("host") == self.record["host"]:
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True  # its process is gone
            except PermissionError:
                pass
        return False

    def _written_by_us(self) -> bool:
        """After a conditional write was refused: whether the lease is ours all the same (S3 answered a write that
        landed with a timeout, and the client's retry of it failed its condition). Then we carry on from it."""
        holder, version = self._read()
        if holder and holder.get("owner") == self.record["owner"]:
            # counted from the stamp of the write that landed (our own wall clock wrote it)
            self.version = version
            self.renewed_at = self.clock.monotonic() - max(0.0, self.clock.time() - holder.get("renewed", 0.0))
            return True
        return False

    def acquire(self) -> Lease:
        holder, version = self._read()
        if holder is not None and not self._free(holder):
            raise OutputBusy(_busy(self.uri, holder, self.ttl, self.clock.time()))
        if not self._write(version) and not self._written_by_us():
            holder, _ = self._read()
            raise OutputBusy(_busy(self.uri, holder or {}, self.ttl, self.clock.time()))
        self._renewer = threading.Thread(target=self._renew_every, args=(self.ttl / 3,), daemon=True,
                                         name="sculpt-lease")
        self._renewer.start()
        return self

    def renew(self) -> bool:
        """Renew the lease; False (and ``lost`` says why) once another job has taken it over."""
        if self._write(self.version) or self._written_by_us():
            return True
        holder, _ = self._read()
        self.lost = "this job lost its lease: " + _busy(self.uri, holder or {}, self.ttl, self.clock.time())
        return False

    def _renew_every(self, seconds: float) -> None:
        wait = seconds
        while not self.clock.wait(self._stop, wait):
            try:
                if not self.renew():
                    return
                wait = seconds if self._unrenewed() < self.ttl / 2 else 0  # it landed late: renew again at once
            except Exception as exc:  # an unreachable store: try again soon
                self.last_error = f"{type(exc).__name__}: {exc}"
                print(f"[sculpt] warning: could not renew the lease on {self.uri}: {self.last_error}", flush=True)
                wait = seconds / 4

    def _unrenewed(self) -> float:
        return self.clock.monotonic() - self.renewed_at

    def check(self, poll_seconds: float = 1.0) -> None:
        """Stop the job once another one has taken the output over (its start clears this job's temporary files);
        wait while the lease is past half its ttl unrenewed, until a renewal lands or finds it taken over."""
        announced = False
        while not self.lost and not self._stop.is_set() and self._unrenewed() > self.ttl / 2:
            if not announced:
                print(f"[sculpt] the lease on {self.uri} was last renewed {self._unrenewed():.0f} s ago (the store "
                      "is unreachable?); commits wait until a renewal lands", flush=True)
                announced = True
            if self._unrenewed() > STALL_TTLS * self.ttl:
                raise OutputBusy(f"this job could not renew its lease on {self.uri} for {self._unrenewed():.0f} s "
                                 f"({self.last_error or 'no answer'}); it stopped, its committed chunks kept. Fix "
                                 "the store's access and rerun the same command to resume.")
            self.clock.wait(self._stop, poll_seconds)
        if self.lost:
            raise OutputBusy(self.lost)
        if announced:
            print(f"[sculpt] the lease on {self.uri} is renewed; commits go on", flush=True)

    def release(self) -> None:
        """Give the output back: the renewals stop, then the lease file goes if it is still ours, with the temporary
        folder its renewals wrote through (when empty) and, locally, the lock file (an older sculpt kept it for good)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            holder, _ = self._read()
            if not holder or holder.get("owner") != self.record["owner"]:
                return  # another job's now (it took the output over), or gone: not ours to delete
            if storage.is_s3(self.uri):  # boto3: pyarrow's delete leaves an empty "folder" object behind
                bucket, key = storage.bucket_key(self.uri)
                storage.s3_client(self.s3).delete_object(Bucket=bucket, Key=key)
                return
            path = os.path.abspath(self.uri)
            with _locked(path):  # takeovers compare and write under this lock: still ours when deleted
                holder, _ = self._read()
                if holder and holder.get("owner") == self.record["owner"]:
                    with contextlib.suppress(OSError):  # no other job writes here while the lease is ours
                        os.rmdir(os.path.join(os.path.dirname(path), storage.TMP_DIR))
                    os.unlink(path)
        except Exception as exc:  # the store unreachable: the job's own outcome (or error) is what matters
            if not storage.is_store_fault(exc, self.uri):
                raise
            print(f"[sculpt] warning: could not give back the lease on {self.uri} ({errors.describe(exc)}); it is "
                  f"free after {self.ttl:.0f} s without renewal", flush=True)


@contextlib.contextmanager
def _locked(path: str):
    """Hold the local lock on the lease file ``path``: ``flock`` on ``<path>.lock``, a file that exists only while
    a job holds it. The holder deletes it before letting go; a job that was waiting then holds a file no longer
    there, which it sees (the path names another file, or none) and so opens the lock file anew. Only a holder
    deletes, so two jobs never hold the lock at once. A holder killed leaves the file, which the next one reuses."""
    lock_path = path + ".lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                named = os.stat(lock_path)
            except FileNotFoundError:
                named = None
        except BaseException:
            os.close(fd)
            raise
        if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # the lock file this job waited on was deleted by its holder: open the current one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)  # the lock goes with the last descriptor


def lease_uri(out: str) -> str:
    return storage.join(out.rstrip("/"), LEASE_FILE)


def read_holder(uri: str, s3: storage.S3Options) -> tuple[dict | None, str | None]:
    """The lease file's record and version (ETag on S3, content locally); (None, None) when there is none."""
    if storage.is_s3(uri):
        client = storage.s3_client(s3)
        data, version = storage.read_retried(lambda: _get(client, uri), uri)  # a body cut short is read again
        if data is None:
            return None, None
    else:
        data = storage.read_bytes(uri)
        if data is None:
            return None, None
        version = data.decode(errors="replace")
    try:
        return json.loads(data), version
    except ValueError:  # empty or cut short (a full disk, an older sculpt, a tool): nobody's, so taken over
        return {}, version


def _get(client, uri: str) -> tuple[bytes | None, str | None]:
    """The S3 object's bytes and ETag; (None, None) for a 404, also one whose error body was cut short (botocore
    then names no NoSuchKey, only the status)."""
    import botocore.exceptions

    bucket, key = storage.bucket_key(uri)
    try:
        got = client.get_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None, None
        raise
    return got["Body"].read(), got["ETag"]


def confirm(out: str, s3: storage.S3Options, owner: str) -> None:
    """Raise ``OutputBusy`` unless the job ``owner`` still holds the output's lease: a commit's last look before
    it writes, so that a commit started before a takeover does not land in the new job's output."""
    uri = lease_uri(out)
    holder, _ = read_holder(uri, s3)
    if (holder or {}).get("owner") != owner:
        raise OutputBusy("this job lost its lease: " + _busy(uri, holder or {}, TTL_SECONDS, time.time()))


def _busy(uri: str, holder: dict, ttl: float, now: float) -> str:
    since = now - holder.get("renewed", now)
    return (f"another job is writing this output: {uri} is held by pid {holder.get('pid')} on "
            f"{holder.get('host')} (renewed {since:.0f} s ago). Wait for it to finish, or, if it is dead, rerun "
            f"after {ttl:.0f} s without renewal (or delete {uri}).")
