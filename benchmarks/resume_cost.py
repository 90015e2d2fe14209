"""Input bytes a resume reads: a rerun of a finished job, and a resume after the driver was killed mid-run.

The shards are served by moto's S3 server on 127.0.0.1, running inside this process. A WSGI wrapper around
the server counts the response-body bytes of every GET of a ``.tar`` object, per object: the bytes that left
storage, whoever asked for them (driver, Ray reader tasks, anything else). That count is independent of the
figure sculpt reports itself (the summary's ``input_bytes_read``, summed from the markers it commits), and the
two are printed side by side. Listing and HEAD responses are counted apart.

Each run is ``workflows/annotate.py`` in a subprocess (local Ray, one logical GPU, output on local disk), with
one stand-in stage (tests/doubles.py:HoldGpu, a fixed service time per image). Runs:

1. full: the job from scratch to completion;
2. rerun: the same command again;
3. killed: the same job into a new output, the driver's process group SIGKILLed once ``--kill-after`` shards
   are committed (as tests/test_workflow.py does);
4. resume: the same command again on that output.

    PYTHONPATH=. RAY_AUTH_MODE=disabled python benchmarks/resume_cost.py [--shards 12] [--images 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH")] if p)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")

import boto3  # noqa: E402
import pyarrow.dataset as pads  # noqa: E402
from moto.moto_server import threaded_moto_server as moto_server  # noqa: E402

from sculpt.testing import samples  # noqa: E402

BUCKET = "bench"


class CountingApp:
    """WSGI middleware: body bytes of GETs of *.tar objects, per path, and of all other responses."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()
        self.tar_bytes: Counter = Counter()
        self.other_bytes = 0

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        tar = environ["REQUEST_METHOD"] == "GET" and path.endswith(".tar")
        for chunk in self.app(environ, start_response):
            with self.lock:
                if tar:
                    self.tar_bytes[path.rsplit("/", 1)[-1][: -len(".tar")]] += len(chunk)
                else:
                    self.other_bytes += len(chunk)
            yield chunk

    def take(self) -> tuple[Counter, int]:
        """Counts since the last take()."""
        with self.lock:
            counts, other = self.tar_bytes, self.other_bytes
            self.tar_bytes, self.other_bytes = Counter(), 0
        return counts, other


class CountingMotoServer(moto_server.ThreadedMotoServer):
    def _server_entry(self) -> None:  # ThreadedMotoServer._server_entry with the app wrapped
        self.app = CountingApp(moto_server.DomainDispatcherApplication(moto_server.create_backend_app))
        self._server = moto_server.make_server(self._ip_address, self._port, self.app, True,
                                               request_handler=moto_server.MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()


def annotate_args(endpoint: str, out: str, seconds: float) -> list[str]:
    stage = {"name": "hold", "class": "tests.doubles:HoldGpu", "gpus": 1, "cpus": 0.5, "batch_size": 1,
             "params": {"seconds_per_image": seconds}}
    return [sys.executable, os.path.join(ROOT, "workflows", "annotate.py"), "--input", f"s3://{BUCKET}/sa1b/",
            "--output", out, "--s3-endpoint", endpoint, "--set", f"stages={json.dumps([stage])}",
            "--set", "input.batch_images=2", "--set", "ray.num_cpus=4", "--set", "ray.num_gpus=1",
            "--set", "progress_seconds=1000"]


def summary_of(stdout: str) -> dict:
    start = stdout.rindex("\n{\n")
    return json.loads(stdout[start: stdout.index("\n}", start) + 2])


def run_to_end(args: list[str]) -> tuple[dict, float]:
    start = time.monotonic()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"annotate.py failed:\n{done.stderr[-3000:]}")
    return summary_of(done.stdout), time.monotonic() - start


def committed(out: str) -> set[str]:
    from sculpt.outputs.store import OutputStore

    return OutputStore(out).committed()


def run_and_kill(args: list[str], out: str, after: int) -> None:
    driver = subprocess.Popen(args, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(committed(out)) < after and driver.poll() is None:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    time.sleep(1.0)  # let any response the server was sending finish or fail


def check_output(out: str, expected: int) -> str:
    rows = pads.dataset(out, format="parquet").to_table(columns=["shard", "index"]).to_pylist()
    keys = [(r["shard"], r["index"]) for r in rows]
    return f"{len(rows)} rows for {expected} images, {len(keys) - len(set(keys))} duplicates"


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.4f} %" if whole else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--images", type=int, default=6, help="images per shard")
    parser.add_argument("--seconds", type=float, default=0.25, help="stand-in stage service time per image")
    parser.add_argument("--kill-after", type=int, default=4, help="kill the driver once this many shards are committed")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="sculpt-resume-")
    # The drivers' own Ray temp dir: a plain ray.init() would join any cluster `ray start` left on this machine.
    ray_tmp = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: socket path limit
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = CountingMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        sizes = {}
        for path in samples.make_sample_shards(os.path.join(work, "in"), shards=args.shards, images_per_shard=args.images):
            name = os.path.basename(path)[: -len(".tar")]
            client.upload_file(path, BUCKET, f"sa1b/{name}.tar")
            sizes[name] = os.path.getsize(path)
        total = sum(sizes.values())
        images = args.shards * args.images
        server.app.take()
        print(f"{args.shards} shards x {args.images} images on S3 (moto, loopback): {total:,} input bytes")

        out = os.path.join(work, "out-full")
        full, full_s = run_to_end(annotate_args(endpoint, out, args.seconds))
        full_tar, full_other = server.app.take()
        rerun, rerun_s = run_to_end(annotate_args(endpoint, out, args.seconds))
        rerun_tar, rerun_other = server.app.take()

        out = os.path.join(work, "out-killed")
        run_and_kill(annotate_args(endpoint, out, args.seconds), out, args.kill_after)
        killed_tar, _ = server.app.take()
        done_at_kill = committed(out)
        in_flight = {k for k, n in killed_tar.items() if n and k not in done_at_kill}
        untouched = set(sizes) - done_at_kill - in_flight
        resumed, resume_s = run_to_end(annotate_args(endpoint, out, args.seconds))
        resume_tar, resume_other = server.app.take()
        resumed_check = check_output(out, images)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    def served(counts, keys=None):
        return sum(n for k, n in counts.items() if keys is None or k in keys)

    print("\n| run | wall s | shards committed | input bytes read (summary) | .tar bytes served (S3 count) | of all input | "
          "other S3 response bytes |")
    print("|---|---|---|---|---|---|---|")
    runs = (("full", full, full_s, full_tar, full_other), ("rerun", rerun, rerun_s, rerun_tar, rerun_other),
            ("resume after kill", resumed, resume_s, resume_tar, resume_other))
    for label, s, sec, tar, other in runs:
        print(f"| {label} | {sec:.1f} | {s['committed_now']} | {s['input_bytes_read']:,} | {served(tar):,} | "
              f"{pct(served(tar), total)} | {other:,} |")
    print(f"\nrerun: .tar bytes read / input bytes = {pct(served(rerun_tar), total)} (goal < 0.1 %); all S3 response bytes "
          f"(listing, HEAD) / input bytes = {pct(served(rerun_tar) + rerun_other, total)}")

    def size(keys):
        return sum(sizes[k] for k in keys)

    print(f"\nkilled after {len(done_at_kill)} of {args.shards} shards were committed; at the kill {len(in_flight)} shards "
          f"were in flight (read from, not committed: {served(killed_tar, in_flight):,} of their {size(in_flight):,} bytes "
          f"read), {len(untouched)} untouched")
    print("| shards at the kill | shards | their input bytes | bytes read by the resume (S3 count) | read / size |")
    print("|---|---|---|---|---|")
    for label, keys in (("committed", done_at_kill), ("in flight", in_flight), ("untouched", untouched)):
        read = served(resume_tar, keys)
        print(f"| {label} | {len(keys)} | {size(keys):,} | {read:,} | {read / size(keys) if keys else 0:.3f} |")
    print(f"resume: summary input_bytes_read {resumed['input_bytes_read']:,} vs S3 count {served(resume_tar):,}; "
          f"re-read because of the kill (in-flight shards) / all input = {pct(served(resume_tar, in_flight), total)}")
    print(f"output after the resume: {resumed_check}")


if __name__ == "__main__":
    main()
