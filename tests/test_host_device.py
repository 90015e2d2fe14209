"""Host work off the device's critical path: images decoded on the model's device, and an actor's batches
overlapping (one on the device while the next is decoded), with the device part one batch at a time."""

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sculpt import config  # noqa: E402
from sculpt.annotation import images
from sculpt.engine.job import annotate as run_job
from sculpt.testing import samples
from sculpt.stage import DeviceTurn, Resources, ray_options  # noqa: E402
from tests.test_workflow import job, output_rows  # noqa: E402


def png_bytes(image):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def turned_jpeg(image):
    import io

    from PIL import Image

    picture = Image.fromarray(image)
    exif = picture.getexif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees clockwise
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_decode_on_sends_plain_jpegs_to_the_gpu_decoder_and_the_rest_to_the_host():
    photo = samples.photo("rocket")[:64, :96]
    datas = [samples.jpeg_bytes(photo, quality=95), png_bytes(photo), turned_jpeg(photo), b"not an image",
             samples.jpeg_bytes(photo[:, :, 0], quality=95), samples.jpeg_bytes(photo[:40], quality=95)]
    batches = []

    def gpu_decoder(encoded, device):  # stands in for nvJPEG: decodes the same files, records what it got
        batches.append(len(encoded))
        return [torch.from_numpy(images.load_rgb(data)) for data in encoded]

    out = images.decode_on("cpu", datas, batch_decoder=gpu_decoder)
    assert batches == [2]  # the two plain RGB JPEGs, in one call; PNG, EXIF-turned, gray and garbage stay on the host
    assert isinstance(out[3], images.ImageError) and "no known image format" in str(out[3])
    for data, image in zip(datas, out):
        if data != datas[3]:
            assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8
            assert np.array_equal(image.numpy(), images.load_rgb(data))  # upright RGB, whoever decoded it
    assert out[2].shape[:2] == (96, 64)  # turned upright

    host = images.decode_on("cpu", datas)  # no batch decoder on the CPU by default: all on the host
    assert batches == [2] and all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(host, out) if a is not host[3])


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_nvjpeg_decodes_beside_another_threads_device_work_as_it_does_alone():
    photos = [samples.photo(name) for name in ("rocket", "coffee", "chelsea", "astronaut")]
    datas = [samples.jpeg_bytes(photo, quality=95) for photo in photos]
    expected = [image.cpu().numpy() for image in images.decode_on("cuda", datas)]  # alone on the device
    assert all(image.shape == images.load_rgb(data).shape for image, data in zip(expected, datas))
    stop, failures = threading.Event(), []

    def churn():  # frees and reuses device memory while kernels that read it are still queued
        while not stop.is_set():
            x = torch.randn(2048, 2048, device="cuda")
            for _ in range(4):
                x = (x @ x).tanh_()

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(20):
            for got, want in zip(images.decode_on("cuda", datas), expected):
                if not np.array_equal(got.cpu().numpy(), want):
                    failures.append(1)
    finally:
        stop.set()
        worker.join()
    assert not failures  # the same pixels as when nothing else ran on the device


def test_a_batch_the_gpu_decoder_refuses_is_decoded_on_the_host():
    datas = [samples.jpeg_bytes(samples.photo("rocket")[:32, :32]), samples.jpeg_bytes(samples.photo("coffee")[:32, :32])]

    def refusing(encoded, device):
        raise RuntimeError("nvjpeg: bitstream error")

    out = images.decode_on("cpu", datas, batch_decoder=refusing)
    assert [tuple(image.shape) for image in out] == [(32, 32, 3), (32, 32, 3)]


def test_device_turn_lets_one_thread_in_and_counts_only_the_waiting_threads_time(monkeypatch):
    import types

    import sculpt.stage

    # DeviceTurn's clock moves only when the test says; "a" holds the turn until "b" has come to it
    now, stamped, changed, leave = [0.0], [], threading.Condition(), threading.Event()

    def perf_counter():
        with changed:
            stamped.append(threading.current_thread().name)
            changed.notify_all()
            return now[0]

    monkeypatch.setattr(sculpt.stage, "time", types.SimpleNamespace(perf_counter=perf_counter))
    turn, inside, most, waited = DeviceTurn(), [0], [0], {}

    def batch(name):
        turn.restart()
        with turn:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
            if name == "a":
                assert leave.wait(60)
            inside[0] -= 1
        waited[name] = turn.waited

    threads = {name: threading.Thread(target=batch, args=(name,), name=name) for name in "ab"}
    threads["a"].start()
    with changed:
        assert changed.wait_for(lambda: stamped.count("a") == 2, timeout=60)  # "a" holds the turn
    threads["b"].start()
    with changed:
        assert changed.wait_for(lambda: "b" in stamped, timeout=60)  # "b" comes to the turn, and waits
        now[0] += 0.2  # while "a" works on the device
    leave.set()
    for thread in threads.values():
        thread.join()
    assert most[0] == 1
    assert sorted(waited.values())[0] < 0.05 and sorted(waited.values())[1] > 0.15  # the second waited its turn


def test_ray_options_run_batches_in_threads_of_one_actor():
    compute = ray_options(Resources(actors=3, batches_in_flight=2))["compute"]
    assert (compute.min_size, compute.max_concurrent_calls_per_actor, compute.enable_true_multi_threading) == (3, 2, True)
    assert ray_options(Resources(batches_in_flight=1))["compute"].enable_true_multi_threading is False
    with pytest.raises(config.ConfigError, match="batches_in_flight"):
        config.load(None, ['stages=[{"name": "x", "class": "tests.doubles:TakesTurns", "batches_in_flight": 0}]'])


def test_an_actor_holds_two_batches_while_their_device_parts_take_turns(local_ray, sample_shards, tmp_path):
    stage = {"name": "turns", "class": "tests.doubles:TakesTurns", "cpus": 0.5, "gpus": 0.5, "batch_size": 1,
             "batches_in_flight": 2, "params": {"host_seconds": 0.3, "device_seconds": 0.3, "wait_for_two_seconds": 60}}
    cfg, built = job(sample_shards[:2], tmp_path / "out", [stage])
    summary = run_job(cfg, built)
    rows = output_rows(tmp_path / "out")
    assert summary["images"] == len(rows) == 8 and summary["errors"] == 0
    held, in_turn = max(tuple(map(int, row["caption"].split(","))) for row in rows)
    assert held == 2  # the next batch's host part ran while one was on the device
    assert in_turn == 1  # and never two on the device at once
