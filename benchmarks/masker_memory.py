"""Peak memory and time of the masker for 50 boxes on a 1500 x 2250 image: early RLE vs full-resolution float masks.

Variants, each in a fresh process on the tiny SAM2 checkpoint (sculpt.testing.tiny_sam2; the decoder's 256 x 256
logits and everything after them have the real model's sizes, only the image encoder is tiny):

- ``early-rle``: actors.mask.Masker.predict — one decoder call for all boxes, then masks brought to full resolution
  ``masks_at_once`` at a time and RLE-encoded at once (default 8; also shown with 1 and 50)
- ``float-masks``: the stock ``SAM2ImagePredictor.predict`` — all N x H x W float32 masks at once, then RLE

Peak memory is the process's resident set (psutil, sampled every millisecond, and getrusage's high-water mark)
above its level just before the call, after a warm-up call on the same image; tracemalloc's peak covers numpy
allocations only (torch's are invisible to it). Time is the wall time of the call (embedding + decoder + masks +
RLE), best of ``--repeat``.

    .venv/bin/python benchmarks/masker_memory.py [--boxes 50] [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc


WIDTH, HEIGHT = 2250, 1500
MiB = 1 << 20


def inputs(n_boxes: int):
    import cv2
    import numpy as np

    from sculpt.testing import samples

    image = cv2.resize(samples.photo("coffee"), (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)
    rng = np.random.default_rng(0)
    sizes = rng.uniform(0.05, 0.6, size=(n_boxes, 2)) * [WIDTH, HEIGHT]
    corners = rng.uniform(0, 1, size=(n_boxes, 2)) * ([WIDTH, HEIGHT] - sizes)
    return image, np.concatenate([corners, corners + sizes], axis=1).astype(np.float32)


class PeakRss(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)


def measure(variant: str, checkpoint: str, n_boxes: int, masks_at_once: int, repeat: int) -> dict:
    import psutil
    import torch

    from actors.mask import Masker
    from sculpt.annotation import rle

    stage = Masker(model=checkpoint, masks_at_once=masks_at_once)
    stage.setup()
    if variant == "early-rle":
        call = stage.predict
    else:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        predictor = SAM2ImagePredictor(stage.model)

        def call(image, boxes):
            with torch.inference_mode():
                predictor.set_image(image)
                masks, scores, _ = predictor.predict(box=boxes, multimask_output=False)
            return rle.encode_many(masks[:, 0] > 0), scores[:, 0]

    image, boxes = inputs(n_boxes)
    call(image, boxes)  # warm-up: allocator pools, lazy init
    times, rss_peak, tm_peak = [], 0, 0
    for _ in range(repeat):
        before = psutil.Process().memory_info().rss
        sampler = PeakRss()
        sampler.start()
        tracemalloc.start()
        start = time.perf_counter()
        masks, _ = call(image, boxes)
        times.append(time.perf_counter() - start)
        tm_peak = max(tm_peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        sampler.done.set()
        sampler.join()
        rss_peak = max(rss_peak, sampler.peak - before)
        assert len(masks) == n_boxes and masks[0]["size"] == [HEIGHT, WIDTH]
    high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {
        "variant": variant if variant != "early-rle" else f"early-rle (masks_at_once={masks_at_once})",
        "seconds": min(times),
        "peak_rss_above_start_mib": rss_peak / MiB,
        "process_high_water_mib": high_water / MiB,
        "tracemalloc_peak_mib": tm_peak / MiB,
        "rle_kib": sum(len(m["counts"]) for m in masks) / 1024,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "CHECKPOINT", "MASKS_AT_ONCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        variant, checkpoint, at_once = args.one
        print(json.dumps(measure(variant, checkpoint, args.boxes, int(at_once), args.repeat)))
        return

    from sculpt.testing import tiny_sam2

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_sam2.write(tmp)
        results = []
        for variant, at_once in [("early-rle", 1), ("early-rle", 8), ("early-rle", 50), ("float-masks", 0)]:
            out = subprocess.run(
                [sys.executable, __file__, "--boxes", str(args.boxes), "--threads", str(args.threads),
                 "--repeat", str(args.repeat), "--one", variant, checkpoint, str(at_once)],
                check=True, capture_output=True, text=True,
            ).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"masker, {args.boxes} boxes on a {WIDTH}x{HEIGHT} image, tiny SAM2, {args.threads} CPU thread(s), "
          f"best of {args.repeat}")
    print(f"{'variant':34} {'time s':>7} {'peak RSS +MiB':>14} {'high-water MiB':>15} {'tracemalloc MiB':>16} {'RLE KiB':>8}")
    for r in results:
        print(f"{r['variant']:34} {r['seconds']:7.2f} {r['peak_rss_above_start_mib']:14.0f} "
              f"{r['process_high_water_mib']:15.0f} {r['tracemalloc_peak_mib']:16.0f} {r['rle_kib']:8.0f}")


if __name__ == "__main__":
    main()
