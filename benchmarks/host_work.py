"""Host (CPU) work per image of the pipeline's own code on SA-1B-sized images, one thread, no model.

An SA-1B-format shard of 2250 x 1500 photographs with 100 object-like masks per image in its json
(benchmarks/sa1b_like.py) is read and processed step by step, each step timed on its own (best of ``--repeat``
passes over all images, then per image):

- read: ``sculpt.io.shards.read_shard`` — tar stream, member pairing, json parse, header check + 1/8 draft decode
- decode: ``sculpt.annotation.images.load_rgb`` — full decode to an upright RGB array
- model inputs as the stages make them: SAM2 (``images.squash`` to 1024, then ``sam2``'s SAM2Transforms of the
  squashed image), EVF-SAM2 (``sculpt.models.evf_sam2.sam2_input`` 1024 + ``beit3_input`` 224), Florence-2
  (transformers' CLIPImageProcessor, 768), InternVL (transformers' GotOcr2ImageProcessor, 448 tiles, max 6)
- RLE of 50 full-resolution masks as the masker and the verifier do it (``sculpt.annotation.rle.encode_tensors``): run lengths
  counted by torch where the masks are (``rle.run_lengths``), then pycocotools compresses them; area + IoU:
  ``rle.area`` and ``rle.iou`` of 50
- Arrow: ``schema.to_table`` + ``Table.to_pylist`` of rows carrying the image and 50 objects (what every stage
  actor does with its batch)
- Parquet: ``sculpt.outputs.units.UnitWriter`` add + commit of rows with 50 objects (local disk)

Each step is counted as often as the code as written runs it per image, and marked by where it runs on a GPU
node: the device steps (decode by nvJPEG, resize and normalisation, RLE run lengths) cost GPU time there, not
host time; on a CPU-only machine everything is host work. Both totals are printed.

    PYTHONPATH=. python benchmarks/host_work.py [--images 6] [--objects 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tarfile
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import sa1b_like  # noqa: E402  (benchmarks/, the script's own folder)
from sculpt.annotation import images, rle  # noqa: E402
from sculpt import schema
from sculpt.io import shards
from sculpt.models import evf_sam2  # noqa: E402
from sculpt.outputs.store import OutputStore  # noqa: E402
from sculpt.outputs.units import UnitWriter

WORDS = ("the small red mug on the left side of the wooden table next to a blue plate with two "
         "cookies under a lamp behind").split()


def best_per_image(fn, items, repeat: int) -> float:
    """ms per item: the fastest of ``repeat`` passes over all items."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / len(items)


def objects_of(masks: list[dict], rng) -> list[dict]:
    out = []
    for i, mask in enumerate(masks):
        expression = " ".join(rng.choice(WORDS, 16))
        out.append({"phrase": f"object {i}", "phrase_start": 0, "phrase_end": 8, "box": [0.0, 0.0, 10.0, 10.0],
                    "mask": mask, "area": rle.area(mask), "mask_score": 0.9, "expression": expression,
                    "expression_words": 16, "iou": 0.8, "kept": True, "error": None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--objects", type=int, default=50, help="masks per image for RLE, IoU, Arrow and Parquet")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from sam2.utils.transforms import SAM2Transforms
    from transformers import CLIPImageProcessor
    from transformers.models.got_ocr2 import GotOcr2ImageProcessor

    work = tempfile.mkdtemp(prefix="sculpt-host-")
    tar = os.path.join(work, "sa_000000.tar")
    sa1b_like.write_shard(tar, args.images, masks_per_image=100)
    rows = [row for batch in shards.read_shard(tar) for row in batch]
    decoded = [images.load_rgb(row["image_bytes"]) for row in rows]
    masks = []  # N x H x W bool per image: the first `objects` of the image's SA-1B masks
    for row in rows:
        with tarfile.open(tar) as t:
            meta = json.load(t.extractfile(f"./{row['image_key']}.json"))
        # C-contiguous N x H x W, the layout the masker and the verifier hand over (torch .cpu().numpy())
        masks.append(np.ascontiguousarray(np.stack([rle.decode(a["segmentation"]) for a in meta["annotations"][: args.objects]])))
    encoded = [rle.encode_many(m) for m in masks]
    rng = np.random.default_rng(0)
    full_rows = [{**row, "caption": " ".join(rng.choice(WORDS, 120)), "objects": objects_of(e, rng)} for row, e in zip(rows, encoded)]
    print(f"{len(rows)} images {decoded[0].shape[1]}x{decoded[0].shape[0]} (or turned), {os.path.getsize(tar) / len(rows) / 1e6:.2f} MB "
          f"per image in the tar (jpg + json of 100 masks); {args.objects} masks per image; 1 thread")

    sam2 = SAM2Transforms(resolution=1024, mask_threshold=0.0)
    florence = CLIPImageProcessor(size={"height": 768, "width": 768}, do_center_crop=False, resample=3,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    internvl = GotOcr2ImageProcessor(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=6,
                                     image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    store = OutputStore(os.path.join(work, "out"))
    job = {"fingerprint": "bench", "model_ids": {}}

    def write_parquet(_):
        table = schema.to_table([{**r, "unit_end": {"size": len(full_rows), "bytes_read": 1}} for r in full_rows])
        writer = UnitWriter(store, "sa_000000", job)
        writer.add(table)
        writer.commit()

    def arrow_round_trip(row):
        schema.to_table([row]).to_pylist()

    def area_and_iou(rles):
        for a in rles:
            rle.area(a)
            rle.iou(a, a)

    from pycocotools import mask as coco_mask

    def read(_):
        for _batch in shards.read_shard(tar):
            pass

    counts = [rle.run_lengths(torch.from_numpy(m)) for m in masks]
    squashed = [images.squash(torch.from_numpy(im), 1024).numpy() for im in decoded]

    def compress(image_counts):  # what pycocotools does with run lengths counted where the masks are
        height, width = image_counts[1]
        coco_mask.frPyObjects([{"size": [height, width], "counts": c} for c in image_counts[0]], height, width)

    sized_counts = [(c, m.shape[1:]) for c, m in zip(counts, masks)]
    n = len(rows)
    host, device = "host", "device"
    steps = [  # (step, ms per image, times per image as wired, where, where it runs on a GPU node)
        ("read (tar + pairing + json + validation)", best_per_image(read, [None], args.repeat) / n, 1, "reader task", host),
        ("decode on the host (load_rgb)", best_per_image(lambda r: images.load_rgb(r["image_bytes"]), rows, args.repeat), 2,
         "caption + refer (VLMEngine.chat)", host),
        ("decode (decode_on: nvJPEG on CUDA)", best_per_image(lambda r: images.load_rgb(r["image_bytes"]), rows, args.repeat), 3,
         "ground, mask, verify", device),
        ("SAM2 squash to 1024 (images.squash)", best_per_image(lambda im: images.squash(torch.from_numpy(im), 1024), decoded,
                                                               args.repeat), 1, "mask", device),
        ("SAM2 input of the squashed image (SAM2Transforms)", best_per_image(sam2, squashed, args.repeat), 1,
         "mask (sam2's predictor)", host),
        ("EVF-SAM2 inputs 1024 + 224",
         best_per_image(lambda im: (evf_sam2.sam2_input(im), evf_sam2.beit3_input(im)), decoded, args.repeat), 1, "verify", device),
        ("Florence-2 input 768", best_per_image(lambda im: florence(im, return_tensors="pt"), decoded, args.repeat), 1,
         "ground (once per image)", device),
        ("InternVL tiles 6 x 448 + thumbnail", best_per_image(lambda im: internvl(im, return_tensors="pt"), decoded, args.repeat), 1,
         "vLLM's processor (cached for refer)", host),
        (f"RLE run lengths of {args.objects} masks (rle.run_lengths)",
         best_per_image(lambda m: rle.run_lengths(torch.from_numpy(m)), masks, args.repeat), 2, "mask, verify", device),
        (f"RLE compress of {args.objects} masks' runs (pycocotools)", best_per_image(compress, sized_counts, args.repeat), 2,
         "mask, verify", host),
        (f"area + IoU of {args.objects} RLEs", best_per_image(area_and_iou, encoded, args.repeat), 1, "mask (area), verify (IoU)", host),
        (f"Arrow rows <-> table ({args.objects} objects + image)", best_per_image(arrow_round_trip, full_rows, args.repeat), 5,
         "every stage actor", host),
        ("Parquet write (UnitWriter)", best_per_image(write_parquet, [None], args.repeat) / n, 1, "driver", host),
    ]
    print("\n| step | ms / image | times per image as wired | where | on a GPU node |")
    print("|---|---|---|---|---|")
    for name, ms, times, where, runs_on in steps:
        print(f"| {name} | {ms:.1f} | {times} | {where} | {runs_on} |")
    cpu_only = sum(ms * times for _, ms, times, _, _ in steps)
    gpu_node = sum(ms * times for _, ms, times, _, runs_on in steps if runs_on == host)
    print(f"| **host work as wired, CPU only (every step on the host)** | **{cpu_only:.0f}** | | | |")
    print(f"| **host work as wired on a GPU node (device steps off the host)** | **{gpu_node:.0f}** | | | |")
    print(f"\nas wired on a GPU node: {1000 / gpu_node:.1f} images/s per core of host work")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
