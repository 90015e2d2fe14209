"""``sculpt export``: the output's (expression, mask) pairs in the formats grounding tools load.

A *pair* is one object of an ``ok`` row that has a mask and a referring expression and no object error.
By default only kept pairs (the verifier's IoU reached the threshold) are exported; ``keep_all=True``
(``--all``) exports every pair with its ``iou`` and ``kept``. Error and empty rows have no pairs.

Every exported record names where it came from: ``shard``, ``index`` (the image's row in that shard's Parquet
file) and ``object`` (the position in the row's ``objects`` list). Images are referenced, not copied, as
``<shard>/<image_key>.jpg`` (the tar member of that input shard).

Formats (``FORMATS``):

- ``gseval``: GroundingSuite's GSEval jsonl, one pair a line — ``idx``, ``image_path``, ``class_id``, ``label``
  (the expression), ``caption``, ``box`` (x0, y0, x1, y1 pixels), ``segmentation`` (COCO RLE, counts a string),
  plus ``shard``/``index``/``object``/``phrase``/``iou``/``kept``, which GroundingSuite's evaluator ignores.
  ``class_id`` is always 4 ("single object"): sculpt does not classify objects as stuff/part/multi yet.
- ``coco``: one COCO instances JSON (``images``, ``annotations`` with RLE ``segmentation`` and xywh ``bbox``,
  one category ``object``) plus RefCOCO-style ``refs`` (``ref_id``, ``ann_id``, ``image_id``, ``sentences``);
  ``pycocotools.coco.COCO`` loads it. Only images with at least one exported pair are listed.
- ``hf``: a directory of Parquet files, one row per pair (``PAIR_SCHEMA``), for
  ``datasets.load_dataset("parquet", data_files=f"{DEST}/*.parquet")``.

The output is read a record batch at a time (``pyarrow.dataset``), and written as it goes: memory stays bounded
by a batch whatever the output's size. OUT and DEST may be local paths or ``s3://`` URIs (``sculpt.storage``);
each exported file appears whole or not at all.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sculpt import schema, storage
from sculpt.output import MARKERS
from sculpt.storage import S3Options

FORMATS = ("gseval", "coco", "hf")
SINGLE_OBJECT = 4  # GSEval's class_id: 1 stuff, 2 part, 3 multi, 4 single
READ_COLUMNS = ["shard", "index", "image_key", "image_id", "file_name", "width", "height", "status", "caption", "objects"]

PAIR_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("index", pa.int32()),
        ("object", pa.int32()),  # position in the row's `objects`
        ("image_key", pa.string()),
        ("image_id", pa.int64()),
        ("image_path", pa.string()),  # <shard>/<image_key>.jpg
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
        ("phrase", pa.string()),
        ("expression", pa.string()),
        ("box", pa.list_(pa.float32(), 4)),  # x0, y0, x1, y1 pixels
        ("mask", schema.MASK_TYPE),  # COCO RLE {size: [h, w], counts: str}
        ("area", pa.int64()),
        ("iou", pa.float32()),
        ("kept", pa.bool_()),
    ]
)


class ExportError(RuntimeError):
    pass


def data_files(out: str, s3: S3Options = S3Options()) -> list[str]:
    """The output's Parquet files (paths inside their filesystem), bookkeeping (``_*``) left out.

    When the output has markers, only committed units count: a Parquet file without its marker belongs to a
    unit that a rerun will replace.
    """
    fs, path = storage.filesystem(out, s3)
    names = [n for n in storage.list_names(out, s3, ".parquet") if not n.startswith("_")]
    committed = {n[: -len(".json")] for n in storage.list_names(storage.join(out, MARKERS), s3, ".json")}
    if committed:
        names = [n for n in names if n[: -len(".parquet")] in committed]
    return [f"{path}/{n}" for n in names]


def image_path(row: dict) -> str:
    return f"{row['shard']}/{row['image_key']}.jpg"


def iter_rows(out: str, s3: S3Options = S3Options(), batch_size: int = 256):
    """The output's rows (READ_COLUMNS only) as dicts, one record batch in memory at a time."""
    files = data_files(out, s3)
    if not files:
        return
    fs, _ = storage.filesystem(out, s3)
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    for batch in dataset.to_batches(columns=READ_COLUMNS, batch_size=batch_size):
        yield from batch.to_pylist()


def pairs_of(row: dict, keep_all: bool = False):
    """(position, object) of the row's exportable pairs."""
    if row.get("status") != schema.OK:
        return
    for position, obj in enumerate(row.get("objects") or []):
        if obj.get("error") or not obj.get("mask") or not obj.get("expression"):
            continue
        if keep_all or obj.get("kept") is True:
            yield position, obj


def pair_record(row: dict, position: int, obj: dict) -> dict:
    """One pair as a PAIR_SCHEMA row."""
    return {
        "shard": row["shard"], "index": row["index"], "object": position, "image_key": row["image_key"],
        "image_id": row.get("image_id"), "image_path": image_path(row), "width": row["width"], "height": row["height"],
        "caption": row.get("caption"), "phrase": obj.get("phrase"), "expression": obj["expression"],
        "box": [float(v) for v in obj["box"]] if obj.get("box") is not None else None,
        "mask": {"size": [int(v) for v in obj["mask"]["size"]], "counts": obj["mask"]["counts"]},
        "area": obj.get("area"), "iou": obj.get("iou"), "kept": obj.get("kept"),
    }


def iter_pairs(out: str, s3: S3Options = S3Options(), keep_all: bool = False, batch_size: int = 256):
    """(row, pairs of the row) for every row of the output that has at least one exportable pair."""
    for row in iter_rows(out, s3, batch_size):
        pairs = [pair_record(row, position, obj) for position, obj in pairs_of(row, keep_all)]
        if pairs:
            yield row, pairs


def _refuse_existing(dest: str, s3: S3Options, overwrite: bool) -> None:
    fs, path = storage.filesystem(dest, s3)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound or overwrite:
        return
    if info.type == pafs.FileType.Directory and not fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        return
    raise ExportError(f"{dest} exists; choose another destination or pass --overwrite")


def _tidy_tmp(uri: str, s3: S3Options) -> None:
    """Remove the empty ``_tmp`` folder that atomic writes leave beside a local file."""
    fs, path = storage.filesystem(uri, s3)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path.rsplit('/', 1)[0]}/{storage.TMP_DIR}"
        if fs.get_file_info(tmp).type == pafs.FileType.Directory and not fs.get_file_info(pafs.FileSelector(tmp)):
            fs.delete_dir(tmp)


def _line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


def gseval_record(idx: int, pair: dict) -> dict:
    return {
        "idx": idx, "image_path": pair["image_path"], "class_id": SINGLE_OBJECT, "label": pair["expression"],
        "caption": pair["caption"] or "", "box": pair["box"], "segmentation": pair["mask"],
        "shard": pair["shard"], "index": pair["index"], "object": pair["object"], "phrase": pair["phrase"],
        "iou": pair["iou"], "kept": pair["kept"],
    }


def export_gseval(out: str, dest: str, s3: S3Options = S3Options(), keep_all: bool = False) -> dict:
    counts = {"images": 0, "pairs": 0}
    with storage.open_atomic(dest, s3) as f:
        for _, pairs in iter_pairs(out, s3, keep_all):
            counts["images"] += 1
            for pair in pairs:
                f.write(_line(gseval_record(counts["pairs"], pair)))
                counts["pairs"] += 1
    _tidy_tmp(dest, s3)
    return counts


def _tokens(sentence: str) -> list[str]:
    return re.findall(r"[\w']+", sentence.lower())


def export_coco(out: str, dest: str, s3: S3Options = S3Options(), keep_all: bool = False) -> dict:
    """COCO instances + refs, written as a stream: images straight to DEST, annotations and refs to local
    temporary files that are appended after them (COCO's JSON keeps each kind in one array)."""
    counts = {"images": 0, "pairs": 0}
    with storage.open_atomic(dest, s3) as f, tempfile.TemporaryFile() as anns, tempfile.TemporaryFile() as refs:
        f.write(b'{"info": {"description": "sculpt export: referring expressions and masks"}, "licenses": [], '
                b'"categories": [{"id": 1, "name": "object", "supercategory": "object"}],\n"images": [')
        for row, pairs in iter_pairs(out, s3, keep_all):
            counts["images"] += 1
            image_id = counts["images"]
            image = {"id": image_id, "file_name": image_path(row), "width": row["width"], "height": row["height"],
                     "shard": row["shard"], "index": row["index"], "image_key": row["image_key"],
                     "sa1b_image_id": row.get("image_id"), "caption": row.get("caption")}
            f.write((b",\n" if image_id > 1 else b"\n") + json.dumps(image, ensure_ascii=False).encode())
            for pair in pairs:
                counts["pairs"] += 1
                ann_id = counts["pairs"]
                x0, y0, x1, y1 = pair["box"]
                sep = b",\n" if ann_id > 1 else b"\n"
                anns.write(sep + json.dumps({
                    "id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": pair["mask"],
                    "area": pair["area"], "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
                    "shard": pair["shard"], "index": pair["index"], "object": pair["object"],
                    "phrase": pair["phrase"], "iou": pair["iou"], "kept": pair["kept"],
                }, ensure_ascii=False).encode())
                tokens = _tokens(pair["expression"])
                refs.write(sep + json.dumps({
                    "ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1,
                    "file_name": image_path(row), "sent_ids": [ann_id],
                    "sentences": [{"sent_id": ann_id, "raw": pair["expression"], "sent": " ".join(tokens), "tokens": tokens}],
                    "shard": pair["shard"], "index": pair["index"], "object": pair["object"],
                }, ensure_ascii=False).encode())
        for name, part in ((b"annotations", anns), (b"refs", refs)):
            f.write(b'\n],\n"' + name + b'": [')
            part.seek(0)
            shutil.copyfileobj(part, f, 1 << 20)
        f.write(b"\n]}\n")
    _tidy_tmp(dest, s3)
    return counts


def export_hf(out: str, dest: str, s3: S3Options = S3Options(), keep_all: bool = False, rows_per_file: int = 100_000) -> dict:
    """Parquet files ``pairs-00000.parquet``, … under DEST, ``rows_per_file`` pairs each, row groups of 1024."""
    counts = {"images": 0, "pairs": 0, "files": 0}
    state = {"file": None, "writer": None, "in_file": 0}
    buffer: list[dict] = []

    def flush(final: bool = False):
        if buffer:
            if state["writer"] is None:
                state["file"] = storage.open_atomic(storage.join(dest, f"pairs-{counts['files']:05d}.parquet"), s3)
                state["writer"] = pq.ParquetWriter(state["file"].__enter__(), PAIR_SCHEMA, compression="zstd")
            state["writer"].write_table(pa.Table.from_pylist(buffer, schema=PAIR_SCHEMA))
            state["in_file"] += len(buffer)
            buffer.clear()
        if state["writer"] is not None and (final or state["in_file"] >= rows_per_file):
            state["writer"].close()
            state["file"].__exit__(None, None, None)
            state.update(file=None, writer=None, in_file=0)
            counts["files"] += 1

    try:
        for _, pairs in iter_pairs(out, s3, keep_all):
            counts["images"] += 1
            for pair in pairs:
                buffer.append(pair)
                counts["pairs"] += 1
                if len(buffer) >= 1024 or state["in_file"] + len(buffer) >= rows_per_file:
                    flush()
        flush(final=True)
    except BaseException as exc:
        if state["writer"] is not None:
            state["writer"].close()
            state["file"].__exit__(type(exc), exc, None)
        raise
    _tidy_tmp(storage.join(dest, "x"), s3)
    return counts


def export(out: str, dest: str, fmt: str, s3: S3Options = S3Options(), keep_all: bool = False, overwrite: bool = False) -> dict:
    """Export OUT's pairs to DEST in ``fmt``; returns counts of images and pairs written."""
    writers = {"gseval": export_gseval, "coco": export_coco, "hf": export_hf}
    if fmt not in writers:
        raise ExportError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    if not data_files(out, s3):
        raise ExportError(f"{out}: no sculpt output here (no committed Parquet files)")
    _refuse_existing(dest, s3, overwrite)
    if fmt == "hf" and overwrite:
        for name in storage.list_names(dest, s3, ".parquet"):  # a previous export's files, and only those
            fs, path = storage.filesystem(storage.join(dest, name), s3)
            fs.delete_file(path)
    return writers[fmt](out, dest, s3, keep_all)
