"""Small SA-1B-format shards built from real photographs that ship inside scikit-image.

Each image gets a json with SA-1B's layout — ``image{image_id, width, height, file_name}`` and
``annotations[{id, segmentation{size, counts}, bbox, area, predicted_iou, stability_score, crop_box,
point_coords}]`` — with masks from simple intensity thresholds, encoded by pycocotools.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np

from sculpt.annotation import rle

# Colour photographs in skimage.data, a mix of landscape, portrait (rocket is turned) and square shapes.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    return np.ascontiguousarray(np.rot90(image)) if name == "rocket" else image


def jpeg_bytes(image: np.ndarray, quality: int = 90, **save_options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, **save_options)
    return buffer.getvalue()


def sa1b_json(image_id: int, image: np.ndarray, masks: list[np.ndarray] = ()) -> bytes:
    height, width = image.shape[:2]
    annotations = []
    for i, mask in enumerate(masks):
        encoded = rle.encode(mask)
        ys, xs = np.nonzero(mask)
        x0, y0 = (int(xs.min()), int(ys.min())) if len(xs) else (0, 0)
        x1, y1 = (int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0)
        annotations.append(
            {
                "id": image_id * 1000 + i,
                "segmentation": encoded,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": rle.area(encoded),
                "predicted_iou": 0.9,
                "stability_score": 0.95,
                "crop_box": [0, 0, width, height],
                "point_coords": [[float((x0 + x1) / 2), float((y0 + y1) / 2)]],
            }
        )
    record = {
        "image": {"image_id": image_id, "width": width, "height": height, "file_name": f"sa_{image_id}.jpg"},
        "annotations": annotations,
    }
    return json.dumps(record).encode()


def threshold_masks(image: np.ndarray, levels=(0.33, 0.66)) -> list[np.ndarray]:
    gray = image.mean(axis=2) if image.ndim == 3 else image.astype(float)
    cuts = np.quantile(gray, levels)
    return [gray < cuts[0], gray >= cuts[-1]]


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    """A tar with the given (name, bytes) members, in that order; gzip-compressed when the path ends in .gz."""
    with tarfile.open(path, "w:gz" if path.endswith(".gz") else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_sample_shards(out_dir: str, shards: int = 2, images_per_shard: int = 4, scale: float = 1.0,
                       compressed: bool = False) -> list[str]:
    """Write ``sa_000000.tar``... into out_dir (``.tar.gz`` when ``compressed``: read in order, as S3 shards are);
    returns their paths. ``scale`` enlarges the photos (benchmarks)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for s in range(shards):
        members = []
        for i in range(images_per_shard):
            image_id = 1 + s * images_per_shard + i
            image = photo(PHOTOS[(image_id - 1) % len(PHOTOS)])
            if scale != 1.0:
                import cv2

                image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
            members += [
                (f"./sa_{image_id}.jpg", jpeg_bytes(image)),
                (f"./sa_{image_id}.json", sa1b_json(image_id, image, threshold_masks(image))),
            ]
        path = os.path.join(out_dir, f"sa_{s:06d}.tar" + (".gz" if compressed else ""))
        write_tar(path, members)
        paths.append(path)
    return paths


def make_sample_inputs(out_dir: str, kind: str, images: int = 6, per_file: int = 3) -> str:
    """``images`` of the photographs as one of the other inputs (README: Input): ``images`` a folder of JPEG, PNG
    and WebP files (under a subfolder too), ``webdataset`` tars of ``per_file`` samples (``<key>.jpg``, a
    ``.json`` beside every other one, a ``.cls``), ``parquet`` Parquet files in Hugging Face's layout (an ``image``
    struct ``{bytes, path}`` and an ``id`` column, row groups of 2). Returns the path to give ``--input``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    encoded = []
    for i in range(images):
        image, fmt = photo(PHOTOS[i % len(PHOTOS)]), ("JPEG", "PNG", "WEBP")[i % 3]
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
        encoded.append((f"photo_{i:04d}", {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt], buffer.getvalue()))
    files = [encoded[j:j + per_file] for j in range(0, images, per_file)]
    for n, group in enumerate(files):
        if kind == "images":
            for key, ext, data in group:
                path = os.path.join(out_dir, "more" if n % 2 else "", f"{key}.{ext}")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
        elif kind == "webdataset":
            members = []
            for j, (key, ext, data) in enumerate(group):
                members += [(f"{key}.{ext}", data), (f"{key}.cls", str(j).encode())]
                members += [(f"{key}.json", json.dumps({"source": key}).encode())] if j % 2 else []
            write_tar(os.path.join(out_dir, f"photos-{n:06d}.tar"), members)
        elif kind == "parquet":
            rows = {"id": [key for key, _, _ in group],
                    "image": [{"bytes": data, "path": f"{key}.{ext}"} for key, ext, data in group]}
            pq.write_table(pa.table(rows), os.path.join(out_dir, f"train-{n:05d}.parquet"), row_group_size=2)
        else:
            raise ValueError(f"kind={kind!r}: images, webdataset or parquet")
    return out_dir
