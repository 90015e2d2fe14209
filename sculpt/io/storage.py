"""Local paths and s3:// URIs behind one interface (pyarrow.fs).

S3 credentials come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
instance roles...); ``S3Options.endpoint`` points at any S3-compatible store (MinIO, Ceph, R2...).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import tempfile
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

from sculpt import errors


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None  # e.g. http://127.0.0.1:9000 (scheme required); None: AWS (or AWS_ENDPOINT_URL)
    region: str | None = None  # None: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1
    # Tries of each S3 request, with the AWS SDK's standard backoff (throttling and 5xx are retried); a fault that
    # outlasts them fails the read of that shard (retried from where it broke) or the commit of that unit.
    retry_attempts: int = 10
    connect_timeout: float = 10.0  # seconds
    request_timeout: float = 60.0  # seconds without progress on one request

    def __post_init__(self):
        if self.endpoint and "://" not in self.endpoint:
            raise ValueError(f"endpoint={self.endpoint!r} has no scheme: write http://{self.endpoint} or "
                             f"https://{self.endpoint}")
        if not isinstance(self.retry_attempts, int) or self.retry_attempts < 1:
            raise ValueError(f"retry_attempts={self.retry_attempts!r}: must be an integer >= 1")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _endpoint(s3: S3Options) -> str | None:
    if s3.endpoint:
        return s3.endpoint
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(name)
        if value and "://" not in value:  # boto3 and pyarrow would fail on it deep inside, with a traceback
            raise errors.JobError(f"{name}={value!r} has no scheme: set it to http://{value} or https://{value}")
        if value:
            return value
    return None


def _region(s3: S3Options) -> str:
    return s3.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def filesystem(uri: str, s3: S3Options = S3Options()) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or s3://bucket/key."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    endpoint = _endpoint(s3)
    options = {
        "region": _region(s3),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=s3.retry_attempts),
        "connect_timeout": s3.connect_timeout,
        "request_timeout": s3.request_timeout,
    }
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        if not sep:
            raise ValueError(f"S3 endpoint {endpoint!r} has no scheme: write http://{endpoint} or https://{endpoint}")
        options.update(endpoint_override=host, scheme=scheme)
    return pafs.S3FileSystem(**options), uri[len("s3://") :].rstrip("/")


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


SHARD_SUFFIXES = (".tar.gz", ".tgz", ".tar")  # what a shard's file name ends with: plain or gzip-compressed tars


def list_files(pattern: str, s3: S3Options = S3Options(), suffixes: tuple[str, ...] = SHARD_SUFFIXES) -> list[str]:
    """Files named by a path, a directory (its files ending in one of ``suffixes``, recursively) or a glob; same
    for s3://."""
    if not is_s3(pattern):
        if glob.has_magic(pattern):
            return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if os.path.isdir(pattern):
            return sorted(p for p in glob.glob(os.path.join(glob.escape(pattern), "**", "*"), recursive=True)
                          if p.endswith(suffixes) and os.path.isfile(p))
        if os.path.isfile(pattern):
            return [pattern]
        raise FileNotFoundError(f"no such input: {pattern}")
    fs, path = filesystem(pattern, s3)
    if glob.has_magic(path):
        root = path[: min(path.index(c) for c in "*?[" if c in path)].rpartition("/")[0]
        deeper = "/" in path[len(root) + 1:]  # a wildcard above the last segment: list the whole tree below root
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=deeper, allow_not_found=True))
        return sorted(f"s3://{i.path}" for i in infos if i.is_file and _glob_match(i.path.split("/"), path.split("/")))
    info = fs.get_file_info(path)
    if info.is_file:
        return [pattern]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted(f"s3://{i.path}" for i in infos if i.is_file and i.path.endswith(suffixes))
    if not files and info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such input: {pattern}")
    return files


class CountingReader:
    """A file object (for tarfile, pyarrow.parquet) that counts the bytes it hands out."""

    def __init__(self, stream):
        self.stream, self.bytes_read = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read() if size is None or size < 0 else self.stream.read(size)
        self.bytes_read += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()


def is_store_fault(exc: BaseException, uri: str) -> bool:
    """A fault of the store at ``uri`` past its clients' own retries, which leaves a unit pending (pyarrow raises
    OSError, boto3 its own errors): transient by ``sculpt.errors.RULES``. A full local disk is not one (job-level:
    every unit would fail); a full disk staging an S3 upload is (another worker may have room)."""
    return errors.is_transient(exc, uri)


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """A path (its segments) against a glob's segments as the local glob matches them: ``*``, ``?`` and ``[...]``
    within one segment, ``**`` any number of segments."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


# A small object's read (the lease, a marker, the job file) is tried this many times in all while the store's faults
# are transient, waiting READ_BACKOFF·2^k before the k-th retry: faults.read_attempts' default, as the config is not
# at hand where these are read (a commit's task, the lease's renewer, `sculpt status`).
READ_ATTEMPTS, READ_BACKOFF = 5, 0.5


def read_retried(read, uri: str):
    """``read()`` of a whole small object of the store at ``uri``, tried again after that store's transient faults
    (``errors.retrying``): its client retries a request that fails, not a body cut short (pyarrow's OSError,
    botocore's ResponseStreamingError or ReadTimeoutError)."""
    return errors.retrying(read, READ_ATTEMPTS, READ_BACKOFF, store=uri)


def read_bytes(uri: str, s3: S3Options = S3Options()) -> bytes | None:
    """The file's bytes, or None when it does not exist (``read_retried``)."""
    fs, path = filesystem(uri, s3)

    def read():
        try:
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    return read_retried(read, uri)


def write_atomic(uri: str, data: bytes, s3: S3Options = S3Options()) -> None:
    """Write a whole file so that a reader sees the old state or the new one, never a part."""
    with open_atomic(uri, s3) as f:
        f.write(data)


def s3_client(s3: S3Options = S3Options()):
    """A boto3 S3 client with the same endpoint, region, retries and timeouts as ``filesystem``."""
    import boto3
    from botocore.config import Config

    # total_max_attempts counts the first try, as pyarrow's max_attempts does (botocore's max_attempts does not)
    config = Config(retries={"mode": "standard", "total_max_attempts": s3.retry_attempts},
                    connect_timeout=s3.connect_timeout, read_timeout=s3.request_timeout)
    return boto3.client("s3", endpoint_url=_endpoint(s3), region_name=_region(s3), config=config)


def bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


class open_atomic:
    """A writable stream whose file appears under ``uri`` only when the stream closes without error.

    Local: the bytes go to ``<dir>/_tmp/<name>.<random>`` and are renamed into place (``_``-prefixed paths are
    ignored by Parquet dataset readers; a leftover is garbage, never output). S3: the bytes go to a local
    temporary file, then one upload to the final key (boto3's transfer manager: a single PUT or a multipart upload,
    which S3 shows only once completed and which is aborted on failure) — no copy, no delete, no size cap.
    """

    def __init__(self, uri: str, s3: S3Options = S3Options()):
        self.uri, self.s3 = uri, s3
        if is_s3(uri):
            handle, self.tmp = tempfile.mkstemp(prefix="sculpt-upload-")
            os.close(handle)
            self.fs = pafs.LocalFileSystem()
        else:
            self.fs, path = filesystem(uri, s3)
            directory, name = path.rsplit("/", 1)
            self.path, self.tmp = path, f"{directory}/{TMP_DIR}/{name}.{uuid.uuid4().hex[:12]}"
            self.fs.create_dir(f"{directory}/{TMP_DIR}", recursive=True)
        self.stream = self.fs.open_output_stream(self.tmp)

    def __enter__(self):
        return self.stream

    def __exit__(self, exc_type, exc, tb):
        try:
            self.stream.close()
            if exc_type is None and is_s3(self.uri):
                s3_client(self.s3).upload_file(self.tmp, *bucket_key(self.uri))
            elif exc_type is None:
                self.fs.move(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):  # an S3 upload's local copy, or a write that failed
                os.unlink(self.tmp)
        return False


def move(source: str, destination: str, s3: S3Options = S3Options()) -> None:
    """Move a file: a rename locally; on S3 one server-side copy (boto3's managed copy: multipart past 5 GB; the
    object appears whole) and the source's delete (pyarrow's move would leave a "folder" object behind)."""
    if is_s3(source):
        client, (bucket, key) = s3_client(s3), bucket_key(source)
        client.copy({"Bucket": bucket, "Key": key}, *bucket_key(destination))
        client.delete_object(Bucket=bucket, Key=key)
        return
    fs, path = filesystem(source, s3)
    fs.move(path, filesystem(destination, s3)[1])


def abort_uploads(uri: str, s3: S3Options = S3Options()) -> int:
    """Abort the unfinished multipart uploads under an s3:// prefix (a killed job's); how many. Local: 0."""
    if not is_s3(uri):
        return 0
    client, (bucket, prefix) = s3_client(s3), bucket_key(uri.rstrip("/") + "/")
    aborted = 0
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted += 1
    return aborted


TMP_DIR = "_tmp"


def delete_tree(uri: str, s3: S3Options = S3Options()) -> None:
    """Delete a folder and everything under it; on S3 the objects under the prefix, and nothing else (pyarrow's
    delete_dir would leave an empty "directory" object for the parent behind)."""
    if is_s3(uri):
        client, (bucket, prefix) = s3_client(s3), bucket_key(uri.rstrip("/") + "/")
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
        return
    fs, path = filesystem(uri, s3)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def list_names(uri: str, s3: S3Options = S3Options(), suffix: str = "") -> list[str]:
    """Base names of the files directly inside a directory / prefix (empty when it does not exist)."""
    fs, path = filesystem(uri, s3)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.is_file and i.base_name.endswith(suffix))
