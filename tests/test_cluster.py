"""The job as a cluster runs it: `ray job submit` against a `ray start --head`, cluster.yaml, Dockerfile."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib

import psutil
import pyarrow.dataset as pads
import pytest
import yaml

from sculpt import config
from sculpt.engine.cluster import resource_demand
from sculpt.testing.samples import make_sample_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """A head node on loopback (its own process group, ended afterwards); yields the dashboard address."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # the job's `python` is this venv's
    dashboard = free_port()
    # Every port the head's agents listen on is its own: their defaults (52365 for the job agent) may be held by
    # another Ray on the machine, and then `ray job submit` finds "No available agent" for as long as it waits
    ports = [f"--{name}-port={free_port()}" for name in ("dashboard-agent-listen", "dashboard-agent-grpc",
                                                          "runtime-env-agent", "metrics-export")]
    # A short temp dir: Ray's socket paths under it must fit AF_UNIX's 107 bytes, which a pytest-xdist worker's
    # tmp_path (.../popen-gw1/ray0/session_<date>_<pid>/sockets/dash_MetricsHead) does not: the head's dashboard
    # failed to start there
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    head = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", "--block", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *ports, "--num-cpus=8", "--num-gpus=2",
         f"--temp-dir={temp_dir}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 300  # a loaded machine: its processes start slowly
        while subprocess.run([f"{BIN}/ray", "job", "list", "--address", address], capture_output=True,
                             env=env).returncode:
            assert time.time() < deadline and head.poll() is None, "the Ray head did not come up"
            time.sleep(1)
        yield address, env
    finally:  # a head that never came up is ended too
        # Killed, with every process it started: a graceful `ray start --block` shutdown takes ~30 s, and a process
        # left behind would hold its ports
        tree = [head, *psutil.Process(head.pid).children(recursive=True)] if head.poll() is None else [head]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        with contextlib.suppress(ProcessLookupError):  # and any that left the tree but not the process group
            os.killpg(head.pid, signal.SIGKILL)
        psutil.wait_procs([p for p in tree if isinstance(p, psutil.Process)], timeout=30)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_workflow(ray_head, tmp_path):
    address, env = ray_head
    make_sample_shards(str(tmp_path / "in"), shards=2, images_per_shard=3)
    stage = {"name": "hold", "class": "tests.doubles:HoldGpu", "gpus": 0.5, "cpus": 0.5}
    command = [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", ROOT, "--",
               "python", "workflows/annotate.py", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
               "--set", f"stages={json.dumps([stage])}"]
    deadline = time.time() + 300
    while True:  # the head's job agent can come up after its dashboard answers (seen on a loaded machine)
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if "No available agent to submit job" not in done.stdout + done.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "shards 2/2" in done.stdout and "succeeded" in done.stdout + done.stderr
    rows = pads.dataset(str(tmp_path / "out"), format="parquet").to_table().to_pylist()
    assert len(rows) == 6 and {r["caption"] for r in rows} == {"hold;"}


def test_cluster_yaml_fits_what_the_example_job_asks_for():
    cluster = yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml")))
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "cluster.yaml has no GPU worker type"
    assert "image" in cluster["docker"]
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))  # what `ray up` checks first
    # Ray's default AMI (CUDA 11.2) cannot run the image's CUDA 13: every node type names its own
    assert all(t["node_config"].get("ImageId") not in (None, "", "latest_dlami") for t in types.values())

    job = config.load(os.path.join(ROOT, "workflows", "annotate.yaml"))
    stages = config.build_stages(job)
    largest = max(gpu_types.values(), key=lambda t: t["resources"]["GPU"])["resources"]
    for stage in stages:  # every actor fits on one node
        assert stage.resources.gpus <= largest["GPU"] and stage.resources.cpus <= largest["CPU"], stage.name
    assert max(job.vlm.gpus, job.vlm.tensor_parallel) <= largest["GPU"]  # tensor parallelism stays in one node
    capacity = {key: sum(t["resources"].get(key, 0) * t.get("max_workers", 0) for t in types.values())
                for key in ("CPU", "GPU")}
    demand = resource_demand(job, stages)
    assert demand["GPU"] <= capacity["GPU"] and demand["CPU"] <= capacity["CPU"], (demand, capacity)


def test_dockerfile_installs_what_pyproject_declares():
    dockerfile = open(os.path.join(ROOT, "Dockerfile")).read()
    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert re.search(r"^FROM nvidia/cuda:", dockerfile, re.M)
    assert '".[gpu]"' in dockerfile or "'.[gpu]'" in dockerfile
    declared = {re.split(r"[\[<>=!~ ]", d)[0].lower()
                for d in project["project"]["dependencies"] + project["project"]["optional-dependencies"]["gpu"]}
    named = set()
    for command in re.findall(r"pip install ([^\n&\\]+)", dockerfile):
        named |= {re.split(r"[\[<>=!~]", w.strip('"\''))[0].lower() for w in command.split()
                  if not w.startswith("-") and not w.strip('"\'').startswith(".")}
    named -= {"pip", "setuptools", "wheel"}  # build tooling
    assert "vllm" in named and named <= declared, f"the Dockerfile installs packages pyproject.toml does not declare: {named - declared}"
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:  # the code it copies
        assert re.search(rf"^COPY {package.rstrip('*')} ", dockerfile, re.M), package
    assert re.search(r"apt-get install[^&]*\brsync\b[^&]*\bopenssh-client\b", dockerfile)  # for Ray's launcher
    python = re.search(r"python3\.(\d+) -m venv", dockerfile)
    assert python and int(python.group(1)) >= int(project["project"]["requires-python"].split(".")[-1])
