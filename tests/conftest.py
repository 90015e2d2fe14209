import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

# sculpt and actors are installed (pip install -e .); pytest puts the checkout on sys.path itself (tests/ is a
# package: the test files import tests.helpers and tests.doubles). Other processes do not get that, so Ray's
# workers and the workflow's subprocesses, which import the test doubles (tests.doubles) by module path, are given
# the checkout through PYTHONPATH. S3 tests talk to moto on loopback only.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH")] if p)
KIT = pytest.StashKey[subprocess.Popen]()  # the process writing the tiny model kit, in the process that started it
# Distinctive fake credentials, so that a test can show they appear in no output file or log.
os.environ.update(AWS_ACCESS_KEY_ID="AKIASCULPTTESTONLY01", AWS_SECRET_ACCESS_KEY="sculpt-fake-secret-never-written",
                  AWS_DEFAULT_REGION="us-east-1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache for vLLM's CPU backend
# Ray starts its workers at nice 15 (jobs' drivers at 0): beside any other busy process the tests' workers got ~3 % of
# a core while the test waited at full priority (a suite run took over 40 minutes under two busy loops). At the
# driver's priority, a loaded machine slows the whole test alike.
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory):
    """Three SA-1B-format shards of four photographs each (read-only: copy before changing)."""
    from sculpt.testing.samples import make_sample_shards

    directory = tmp_path_factory.mktemp("samples")
    return make_sample_shards(str(directory), shards=3, images_per_shard=4)


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the run's own process (pytest-xdist's workers inherit the variable)
        os.environ["SCULPT_TEST_KIT"] = tempfile.mkdtemp(prefix="sculpt-kit-")


LONGEST_FIRST = ["test_faults.py", "test_workflow.py", "test_node_loss.py", "test_inputs.py", "test_review.py",
                 "test_vlm_stages.py", "test_vlm_profiles_served.py", "test_vlm_endpoint.py", "test_vlm.py"]


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected theirs
def pytest_collection_modifyitems(session, config, items):
    """Start writing the tiny model kit (~30 s of training on one core) beside the tests that come before the first
    one that needs it, when any does: ``sculpt models tiny`` in a process of its own, started by the first of the
    run's processes (pytest-xdist workers) to claim it; it leaves its exit status in ``exit``."""
    if hasattr(config, "workerinput"):
        # pytest-xdist (`make test TEST_WORKERS=2`): the longest files first (docs/BENCHMARKS.md, "The test suite's
        # time"), so that the workers end together: Ray jobs while the kit is written, then the vLLM engines
        items.sort(key=lambda item: next((i for i, name in enumerate(LONGEST_FIRST) if item.path.name == name),
                                         len(LONGEST_FIRST)))
    directory = os.environ["SCULPT_TEST_KIT"]
    if any("tiny_models" in getattr(item, "fixturenames", ()) for item in items):
        try:
            open(os.path.join(directory, "claimed"), "x").close()
        except FileExistsError:
            return
        write = '"$1" -m sculpt.cli models tiny "$0/kit" > "$0/write.log" 2>&1; echo $? > "$0/exit.tmp"; mv "$0/exit.tmp" "$0/exit"'
        config.stash[KIT] = subprocess.Popen(["sh", "-c", write, directory, sys.executable], start_new_session=True)


def pytest_unconfigure(config):
    writer = config.stash.get(KIT, None)
    if writer and writer.poll() is None:  # the run ended before the kit was written
        os.killpg(writer.pid, signal.SIGKILL)
        writer.wait()
    if not hasattr(config, "workerinput"):  # after every worker
        shutil.rmtree(os.environ["SCULPT_TEST_KIT"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models():
    """The offline checkpoint kit, written once for the run: {models key: directory}."""
    import yaml

    directory = os.environ["SCULPT_TEST_KIT"]
    deadline = time.monotonic() + 1800
    while not os.path.exists(os.path.join(directory, "exit")):
        assert time.monotonic() < deadline, "the tiny model kit was not written within 30 minutes"
        time.sleep(0.5)
    with open(os.path.join(directory, "exit")) as status, open(os.path.join(directory, "write.log")) as log:
        if status.read().strip() != "0":
            pytest.fail(f"writing the tiny model kit failed:\n{log.read()[-5000:]}")
    with open(os.path.join(directory, "kit", "models.yaml")) as f:
        return yaml.safe_load(f)["models"]


@pytest.fixture(scope="session")
def kit_writer_output(tiny_models) -> str:
    """All that writing the kit printed (stdout and stderr)."""
    with open(os.path.join(os.environ["SCULPT_TEST_KIT"], "write.log")) as f:
        return f.read()


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the whole session: 8 logical CPUs and 4 logical GPUs on this CPU-only machine."""
    import ray

    # address="local": a Ray of its own, never another one this machine runs (which a plain init would join)
    ray.init(address="local", num_cpus=8, num_gpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
