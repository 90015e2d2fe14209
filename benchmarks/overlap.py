"""Host/device overlap inside one stage actor: throughput against max(host, device) and against their sum.

A stage decodes each 2250 x 1500 JPEG on the host (``sculpt.annotation.images.load_rgb``, what the masker does) and then
holds its ``device_turn`` for a fixed device time per image, a sleep that releases the GIL as CUDA work does.
``StageActor`` is called from ``batches_in_flight`` threads at once, as Ray Data calls an actor with
``max_concurrent_calls_per_actor`` (tests/test_host_device.py shows that wiring on a real Ray). With one batch in
flight an image costs host + device; with two, the device should wait for no host step: throughput near
1 / max(host, device).

    PYTHONPATH=. python benchmarks/overlap.py [--images 24] [--batch 4]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_NUM_THREADS", "1")

import sa1b_like  # noqa: E402  (benchmarks/, the script's own folder)
from sculpt.annotation import images  # noqa: E402
from sculpt.testing import samples
from sculpt import schema
from sculpt.stage import Stage, StageActor  # noqa: E402


class DecodeThenDevice(Stage):
    name = "overlap"

    def process(self, rows):
        for row in rows:
            images.load_rgb(row["image_bytes"])
        with self.device_turn:
            time.sleep(float(self.params["device_seconds"]) * len(rows))


def images_per_second(rows, batch: int, device_seconds: float, in_flight: int) -> float:
    actor = StageActor(DecodeThenDevice(batch_size=batch, device_seconds=device_seconds))
    tables = [schema.to_table(rows[i:i + batch]) for i in range(0, len(rows), batch)]
    start = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(actor, tables))
    return len(rows) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    names = list(samples.PHOTOS)
    jpegs = [samples.jpeg_bytes(sa1b_like.photo(names[i % len(names)]), quality=90) for i in range(min(6, args.images))]
    rows = [schema.new_row("u", i, f"sa_{i}", image_bytes=jpegs[i % len(jpegs)], width=2250, height=1500)
            for i in range(args.images)]

    host = 1 / images_per_second(rows, args.batch, 0.0, 1)  # seconds of host work per image, nothing to overlap
    print(f"{args.images} images 2250x1500, batches of {args.batch}; host part (decode + Arrow) {1000 * host:.1f} ms/img")
    print("\n| device ms/img | in flight | images/s | 1/(host+device) | 1/max(host, device) | share of max |")
    print("|---|---|---|---|---|---|")
    for factor in (0.5, 1.0, 2.0):
        device = factor * host
        ideal, serial = 1 / max(host, device), 1 / (host + device)
        for in_flight in (1, 2):
            rate = images_per_second(rows, args.batch, device, in_flight)
            print(f"| {1000 * device:.1f} | {in_flight} | {rate:.1f} | {serial:.1f} | {ideal:.1f} | {rate / ideal:.2f} |")


if __name__ == "__main__":
    main()
