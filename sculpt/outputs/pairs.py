"""Reading an output's pairs for ``sculpt export`` and ``sculpt preview``: committed rows a record batch at a time,
in index order, their (expression, mask) pairs as records, and each row's image from its input shard."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from sculpt import errors, schema
from sculpt.annotation import images, reasoning
from sculpt.annotation.categories import NEGATIVE
from sculpt.io import storage
from sculpt.io.storage import S3Options
from sculpt.outputs.store import OutputStore

READ_COLUMNS = ["shard", "index", "image_key", "image_id", "file_name", "width", "height", "status", "error", "caption",
                "objects"]


class ExportError(errors.JobError):
    pass


def data_files(out: str, s3: S3Options = S3Options()) -> list[str]:
    """The output's Parquet files (paths inside their filesystem), bookkeeping (``_*``) left out.

    In a sculpt output only committed units count: a Parquet file without its marker belongs to a unit that a
    rerun will replace (the first unit of a job killed before its marker was written, too). A folder of Parquet
    files that sculpt did not write (no job file, no markers) is read whole.
    """
    fs, path = storage.filesystem(out, s3)
    names = [n for n in storage.list_names(out, s3, ".parquet") if not n.startswith("_")]
    store = OutputStore(out, s3)  # its markers and job file where this sculpt or an older one keeps them
    committed = store.committed()
    if committed or store.job() is not None:
        names = [n for n in names if n[: -len(".parquet")] in committed]
    return [f"{path}/{n}" for n in names]


def image_path(row: dict, image_root: str = "") -> str:
    relative = f"{row['shard']}/{row['image_key']}.jpg"
    return storage.join(image_root, relative) if image_root else relative


def _rows_in_index_order(dataset: pads.Dataset, batch_size: int):
    """One shard's rows in ``index`` order, ``batch_size`` at a time: a unit's rows are written as its batches
    finish, not in order, and ordered rows let its images stream from the input tar in one forward pass."""
    order = np.argsort(dataset.to_table(columns=["index"])["index"].to_numpy(), kind="stable")
    for start in range(0, len(order), batch_size):
        yield from dataset.take(pa.array(order[start:start + batch_size]), columns=READ_COLUMNS).to_pylist()


def iter_rows(out: str, s3: S3Options = S3Options(), batch_size: int = 256):
    """The output's rows (READ_COLUMNS only) as dicts, shard after shard, each shard's in index order; one
    batch of rows in memory at a time."""
    fs, _ = storage.filesystem(out, s3)
    for path in data_files(out, s3):
        yield from _rows_in_index_order(pads.dataset(path, format="parquet", filesystem=fs), batch_size)


def pairs_of(row: dict, keep_all: bool = False, negatives: bool = False):
    """(position, object) of the row's exportable pairs; negatives (no target) only when asked."""
    if row.get("status") != schema.OK:
        return
    for position, obj in enumerate(row.get("objects") or []):
        if obj.get("error") or not obj.get("mask") or not obj.get("expression"):
            continue
        if obj.get("category") == NEGATIVE and not negatives:
            continue
        if keep_all or obj.get("kept") is True:
            yield position, obj


def style_of(obj: dict) -> str:
    """How the pair's expression names its object: ``plain`` or ``reasoning`` (``sculpt.annotation.reasoning``). An
    object without a style (outputs before schema version 5, where every expression was a plain one) is plain."""
    return obj.get("style") or reasoning.PLAIN


def pair_record(row: dict, position: int, obj: dict, image_root: str = "") -> dict:
    """One pair as a PAIR_SCHEMA row."""
    return {
        "shard": row["shard"], "index": row["index"], "object": position, "image_key": row["image_key"],
        "image_id": row.get("image_id"), "image_path": image_path(row, image_root), "width": row["width"],
        "height": row["height"],
        "caption": row.get("caption"), "phrase": obj.get("phrase"), "expression": obj["expression"],
        "box": [float(v) for v in obj["box"]] if obj.get("box") is not None else None,
        "mask": {"size": [int(v) for v in obj["mask"]["size"]], "counts": obj["mask"]["counts"]},
        "area": obj.get("area"), "iou": obj.get("iou"), "rival_iou": obj.get("rival_iou"),
        "instances": obj.get("instances"), "listener_iou": obj.get("listener_iou"), "kept": obj.get("kept"),
        "reject_reason": obj.get("reject_reason"), "category": obj.get("category"), "style": style_of(obj),
        "members": obj.get("members"),
    }


def iter_pairs(out: str, s3: S3Options = S3Options(), keep_all: bool = False, batch_size: int = 256,
               image_root: str = "", negatives: bool = False):
    """(row, pairs of the row) for every row of the output that has at least one exportable pair."""
    for row in iter_rows(out, s3, batch_size):
        pairs = [pair_record(row, position, obj, image_root) for position, obj in pairs_of(row, keep_all, negatives)]
        if pairs:
            yield row, pairs


class ShardImages:
    """The encoded image of an output row, read from its input shard (a tar, a folder of images, a Parquet file:
    the job file's input kind, ``sculpt.io.inputs``).

    The shards are the job's ``inputs`` (from OUT's job file) unless ``shards`` names where they are now; a folder's
    files are those its listing in OUT records. Rows must come shard after shard in index order (``iter_rows``):
    each shard is then streamed once, forward, through ``sculpt.io.inputs.read_shard`` (local or S3, with its
    retries); a row asked for out of order restarts it.
    """

    def __init__(self, out: str, s3: S3Options = S3Options(), shards: list[str] | None = None):
        self.out, self.s3, self.patterns = out, s3, shards
        self.uris: dict[str, str] | None = None
        self.source = None
        self.shard, self.stream, self.next_index = None, iter(()), 0

    def _uri(self, shard: str) -> str:
        from sculpt.io import inputs
        from sculpt.io.shards import shard_name

        if self.uris is None:
            job = OutputStore(self.out, self.s3).job() or {}
            if self.patterns is None:
                self.patterns = job.get("inputs") or []
            self.source = inputs.Source.of_job(job)
            found = []
            for pattern in self.patterns:
                try:
                    found += inputs.find([pattern], self.source.kind, self.s3, self.source)[1]
                except errors.BadInput:
                    pass
            self.uris = {shard_name(uri): uri for uri in found}
        if shard not in self.uris:
            raise ExportError(f"the input shard of unit {shard} is not under {self.patterns}; pass --shards PATH "
                              "(repeatable) where the input (tars, folder, Parquet files) is now")
        return self.uris[shard]

    def _restart(self, shard: str) -> None:
        from sculpt.io import inputs
        from sculpt.io.shards import ReadOptions

        uri = self._uri(shard)
        files = inputs.read_listing(self.out, shard, self.s3) if self.source.kind == "images" else None
        # No size limit here: the job already refused what it would not read, perhaps under a raised limit.
        options = ReadOptions(s3=self.s3, max_image_pixels=1 << 62, source=self.source)
        batches = inputs.read_shard(uri, options, files)
        self.shard, self.stream, self.next_index = shard, (r for batch in batches for r in batch), 0

    def get(self, row: dict) -> bytes | None:
        """The row's image bytes as they are in the tar; None when the shard holds no image at that index."""
        if row["shard"] != self.shard or row["index"] < self.next_index:
            self._restart(row["shard"])
        for found in self.stream:
            self.next_index = found["index"] + 1
            if found["index"] == row["index"]:
                return found.get("image_bytes")
            if found["index"] > row["index"]:
                break
        return None


def upright_jpeg(data: bytes) -> bytes:
    """The image as an upright JPEG: its own bytes when they already are one (no EXIF rotation, RGB or grey),
    else decoded as every model stage saw it (``sculpt.annotation.images.load_rgb``) and re-encoded at quality 95."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" and image.mode in ("RGB", "L") and image.getexif().get(0x0112, 1) == 1:
            return data
    buffer = io.BytesIO()
    Image.fromarray(images.load_rgb(data)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
