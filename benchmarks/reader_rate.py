"""Reader images/s per shard: one SA-1B-sized shard read in order, against its chunks read in parallel.

The shard is written by benchmarks/sa1b_like.py (2250 x 1500 JPEGs with SA-1B json). "In order" is one
``sculpt.io.shards.read_segment`` over the whole tar, as one reader task reads an S3 or compressed shard; "split" is
``sculpt.io.shards.split`` (headers only) and then each chunk read by its own process, as reader tasks read a local
tar's chunks. The header scan is timed separately. Page cache warm (the shard was just written and read once).

    .venv/bin/python benchmarks/reader_rate.py [--images 64 --chunk 16 --workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import sa1b_like  # noqa: E402  (benchmarks/, the script's own folder)
from sculpt.io import shards  # noqa: E402


def read(segment: shards.Segment) -> int:
    return sum(len(rows) for rows in shards.read_segment(segment))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16, help="input.chunk_images")
    parser.add_argument("--workers", type=int, default=2, help="parallel reader processes (this machine: 2 cores)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "sa_000000.tar")
        sa1b_like.write_shard(path, args.images, masks_per_image=20)
        whole = shards.Segment(path, chunk_images=args.chunk)
        read(whole)  # warm the page cache
        start = time.perf_counter()
        assert read(whole) == args.images
        in_order = time.perf_counter() - start
        start = time.perf_counter()
        pieces = shards.split(whole)
        scan = time.perf_counter() - start
        with ProcessPoolExecutor(args.workers) as pool:
            list(pool.map(read, pieces[: args.workers]))  # start the workers
            start = time.perf_counter()
            assert sum(pool.map(read, pieces)) == args.images
            parallel = time.perf_counter() - start
        size = os.path.getsize(path) / args.images / 1e6
        print(f"{args.images} images of 2250 x 1500 ({size:.2f} MB per image with its json), chunks of {args.chunk}, "
              f"{args.workers} reader processes")
        print("| read | images/s | ms per image |")
        print("|---|---|---|")
        print(f"| in order (one reader) | {args.images / in_order:.0f} | {1000 * in_order / args.images:.2f} |")
        print(f"| split: header scan | {args.images / scan:.0f} | {1000 * scan / args.images:.3f} |")
        print(f"| split: {len(pieces)} chunks, {args.workers} readers | {args.images / parallel:.0f} | "
              f"{1000 * parallel / args.images:.2f} |")
        print(f"speed-up of the split read: {in_order / (scan + parallel):.2f}x (scan included)")


if __name__ == "__main__":
    main()
