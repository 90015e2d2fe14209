import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# sculpt and actors are installed (pip install -e .); pytest puts the checkout on sys.path itself (tests/ is a
# package: the test files import tests.helpers and tests.doubles). Other processes do not get that, so Ray's
# workers and the workflow's subprocesses, which import the test doubles (tests.doubles) by module path, are given
# the checkout through PYTHONPATH. S3 tests talk to moto on loopback only.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH")] if p)
KIT = pytest.StashKey[tuple]()  # (directory, log, the process writing the tiny model kit there)
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


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected theirs
def pytest_collection_modifyitems(session, config, items):
    """Start writing the tiny model kit (~30 s of training on one core) beside the tests that come before the first
    one that needs it, when any does: ``sculpt models tiny`` in a process of its own."""
    if any("tiny_models" in getattr(item, "fixturenames", ()) for item in items):
        directory = tempfile.mkdtemp(prefix="sculpt-kit-")
        log = open(os.path.join(directory, "write.log"), "wb")
        config.stash[KIT] = (directory, log, subprocess.Popen(
            [sys.executable, "-m", "sculpt.cli", "models", "tiny", os.path.join(directory, "kit")],
            stdout=log, stderr=subprocess.STDOUT))


def pytest_unconfigure(config):
    directory, log, writer = config.stash.get(KIT, (None, None, None))
    if writer:
        writer.kill()
        writer.wait()
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_models(pytestconfig):
    """The offline checkpoint kit, written once: {models key: directory}."""
    import yaml

    directory, log, writer = pytestconfig.stash[KIT]
    if writer.wait() != 0:
        with open(os.path.join(directory, "write.log")) as f:
            pytest.fail(f"writing the tiny model kit failed:\n{f.read()[-5000:]}")
    with open(os.path.join(directory, "kit", "models.yaml")) as f:
        return yaml.safe_load(f)["models"]


@pytest.fixture(scope="session")
def kit_writer_output(pytestconfig, tiny_models) -> str:
    """All that writing the kit printed (stdout and stderr)."""
    with open(os.path.join(pytestconfig.stash[KIT][0], "write.log")) as f:
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
