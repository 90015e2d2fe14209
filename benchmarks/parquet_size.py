"""Bytes per mask: sculpt's Parquet output versus the same masks in SA-1B's JSON.

Two sets of SA-1B-format shards at SA-1B-like resolution:

- object-like: 2250 x 1500 photographs with 100 region masks each (benchmarks/sa1b_like.py);
- threshold: ``sculpt.testing.samples.make_sample_shards(scale=3)`` — the photographs enlarged 3x, with the sample
  shards' two intensity-threshold masks per image (ragged, pixel-level edges: a worst case for RLE).

JSON side: the json members' bytes per annotation as they lie in the tar (and the share that is the
``segmentation`` field), and for scale the same members zstd-compressed and the packed bitmap (H x W / 8).
Parquet side: each shard is read by ``sculpt.io.shards.read_shard`` with
``keep_source_annotations``, every annotation's mask is decoded and encoded again by ``sculpt.annotation.rle`` (as the
masker hands masks over), put into the row as an object (``box`` from ``bbox``, ``area``, ``mask_score`` from
``predicted_iou``; no text), and the rows are written by ``sculpt.outputs.units.UnitWriter`` (zstd); bytes per mask
is the Parquet file's size over the masks in it.

    PYTHONPATH=. python benchmarks/parquet_size.py [--images 6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tarfile
import tempfile


import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

import sa1b_like  # noqa: E402  (benchmarks/, the script's own folder)
from sculpt.annotation import rle  # noqa: E402
from sculpt.testing import samples
from sculpt import schema
from sculpt.io import shards
from sculpt.outputs.store import OutputStore  # noqa: E402
from sculpt.outputs.units import UnitWriter


def json_side(tar_path: str) -> dict:
    total = compressed = segmentation = annotations = 0
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.name.endswith(".json"):
                data = tar.extractfile(member).read()
                meta = json.loads(data)
                total += member.size
                compressed += len(pa.compress(data, "zstd", asbytes=True))
                annotations += len(meta["annotations"])
                segmentation += sum(len(json.dumps(a["segmentation"])) for a in meta["annotations"])
    return {"bytes": total, "zstd_bytes": compressed, "annotations": annotations, "segmentation_bytes": segmentation}


def parquet_side(tar_path: str, out_dir: str) -> dict:
    rows = [row for batch in shards.read_shard(tar_path, shards.ReadOptions(keep_source_annotations=True)) for row in batch]
    masks, pixels = 0, []
    for row in rows:
        annotations = json.loads(row.pop("source_annotations"))
        row["source_annotations"] = None
        decoded = np.stack([rle.decode(a["segmentation"]) for a in annotations])
        encoded = rle.encode_many(decoded)
        assert [e["counts"] for e in encoded] == [a["segmentation"]["counts"] for a in annotations]  # same masks
        row["objects"] = [{**dict.fromkeys(field.name for field in schema.OBJECT_TYPE),
                           "box": [x, y, x + w, y + h], "mask": mask, "area": a["area"], "mask_score": a["predicted_iou"]}
                          for a, mask, (x, y, w, h) in zip(annotations, encoded, (a["bbox"] for a in annotations))]
        masks += len(encoded)
        pixels.append(row["width"] * row["height"])
    store = OutputStore(out_dir)
    unit = shards.shard_name(tar_path)
    writer = UnitWriter(store, unit, {"fingerprint": "bench", "model_ids": {}})
    writer.add(schema.to_table(rows))
    writer.commit()
    return {"bytes": os.path.getsize(store.data_uri(unit)), "masks": masks, "images": len(rows), "megapixels": np.mean(pixels) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=6)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="sculpt-pq-")
    sets = {}
    path = os.path.join(work, "objects", "sa_000000.tar")
    os.makedirs(os.path.dirname(path))
    sa1b_like.write_shard(path, args.images, masks_per_image=100)
    sets["object-like, 100 per image"] = path
    sets["threshold, 2 per image"] = samples.make_sample_shards(os.path.join(work, "threshold"), shards=1,
                                                                images_per_shard=args.images, scale=3.0)[0]

    print("| mask set | images | mean MP | masks | bitmap B/mask | SA-1B json B/annotation | of which segmentation | "
          "json zstd B/annotation | Parquet B/mask | json / Parquet |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, tar_path in sets.items():
        j = json_side(tar_path)
        p = parquet_side(tar_path, os.path.join(work, "out-" + label.split(",")[0]))
        per_json, per_parquet = j["bytes"] / j["annotations"], p["bytes"] / p["masks"]
        print(f"| {label} | {p['images']} | {p['megapixels']:.2f} | {p['masks']} | {p['megapixels'] * 1e6 / 8:,.0f} | "
              f"{per_json:,.0f} | {j['segmentation_bytes'] / j['annotations']:,.0f} | {j['zstd_bytes'] / j['annotations']:,.0f} | "
              f"{per_parquet:,.0f} | {per_json / per_parquet:.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
