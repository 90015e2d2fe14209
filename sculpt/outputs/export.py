"""``sculpt export``: the output's (expression, mask) pairs in the formats grounding tools load.

A *pair* is one object of an ``ok`` row that has a mask and a referring expression and no object error.
By default only kept pairs (the verifier's IoU reached the threshold) are exported; ``keep_all=True``
(``--all``) exports every pair with its ``iou`` and ``kept``. Error and empty rows have no pairs.

Each pair says how its expression names the object, its ``style`` (``pairs.style_of``): ``plain`` or ``reasoning``
(by what it is for or what one knows about it; ``sculpt.annotation.reasoning``); outputs before schema version 5
have no style, and their pairs are plain.

Every exported record names where it came from: ``shard``, ``index`` (the image's position in its shard, as in
that shard's Parquet rows) and ``object`` (the position in the row's ``objects`` list). Images are referenced as
``<shard>/<image_key>.jpg`` (the tar member of that input shard), under ``image_root`` when one is given.
``images=DIR`` (``--images DIR``) also extracts each exported image once to ``DIR/<shard>/<image_key>.jpg``,
upright (``upright_jpeg``), streamed from the job's input shards (``ShardImages``); the records then point there.

Formats (``FORMATS``):

- ``gseval``: GroundingSuite's GSEval jsonl, one pair a line — ``idx``, ``image_path``, ``class_id``, ``label``
  (the expression), ``caption``, ``box`` (x0, y0, x1, y1 pixels), ``segmentation`` (COCO RLE, counts a string),
  plus ``shard``/``index``/``object``/``phrase``/``iou``/``kept``/``reject_reason``/``style``, which GroundingSuite's
  evaluator ignores.
  ``class_id`` comes from the pair's category (``sculpt.annotation.categories``; 4, single, for outputs without one).
  Negatives (no target) go only to ``hf``, the one format with a place for a pair without a region.
- ``coco``: one COCO instances JSON (``images``, ``annotations`` with RLE ``segmentation`` and xywh ``bbox``,
  one category ``object``) plus RefCOCO-style ``refs`` (``ref_id``, ``ann_id``, ``image_id``, ``sentences``, the
  expression's ``style``, also on its annotation); ``pycocotools.coco.COCO`` loads it. Only images with at least
  one exported pair are listed.
- ``hf``: a directory of Parquet files, one row per pair (``PAIR_SCHEMA``, its ``style`` a column), for
  ``datasets.load_dataset("parquet", data_files=f"{DEST}/*.parquet")``.
- ``labelstudio``: a Label Studio tasks JSON, one task per image (``data.image``, ``data.caption``), its pairs as
  one prediction: per pair a ``brushlabels`` result (the mask in Label Studio's brush RLE, encoded by
  ``label_studio_sdk.converter.brush``), a per-region ``textarea`` result with the expression (same region id)
  and a ``rectanglelabels`` result with the box in percent; each result's ``meta`` holds shard, index, object,
  phrase, iou, kept and style. ``LABEL_STUDIO_CONFIG`` is the labeling config these results fit.

The output is read a record batch at a time (``pyarrow.dataset``), and written as it goes: memory stays bounded
by a batch whatever the output's size. OUT and DEST may be local paths or ``s3://`` URIs (``sculpt.io.storage``);
each exported file appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sculpt.annotation import rle
from sculpt import schema
from sculpt.io import storage
from sculpt.annotation.categories import CLASS_IDS, SINGLE
from sculpt.io.storage import S3Options
from sculpt.outputs import training
from sculpt.outputs.pairs import ExportError, ShardImages, data_files, image_path, iter_pairs, upright_jpeg

FORMATS = ("gseval", "coco", "hf", "labelstudio") + training.FORMATS  # the training formats: sculpt/outputs/training.py
LABEL = "object"  # the one label of Label Studio's brush and rectangle results
LABEL_STUDIO_CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <Text name="caption" value="$caption"/>
  <BrushLabels name="mask" toName="image"><Label value="{LABEL}"/></BrushLabels>
  <RectangleLabels name="box" toName="image"><Label value="{LABEL}"/></RectangleLabels>
  <TextArea name="expression" toName="image" perRegion="true" editable="true"/>
</View>"""

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
        ("rival_iou", pa.float32()),  # the verifier mask's best IoU with another object (the ambiguity test)
        ("instances", pa.int32()),  # instances of its kind in the image (the instances stage)
        ("listener_iou", pa.float32()),  # the listener's box for the expression against the pair's box
        ("kept", pa.bool_()),
        ("reject_reason", pa.string()),  # the first check of the keep rule it failed; null when kept
        ("category", pa.string()),  # stuff | part | single | multi | negative
        # how the expression names the object: plain | reasoning (sculpt.annotation.reasoning; plain: older outputs)
        ("style", pa.string()),
        ("members", pa.list_(pa.int32())),  # a group's member objects (positions in the row's `objects`)
    ]
)


def extracting_images(pairs, directory: str, source: ShardImages, s3: S3Options, counts: dict):
    """Pass ``iter_pairs``' items through, writing each row's image once, upright, to
    ``directory/<shard>/<image_key>.jpg`` on the way (``counts["image_files"]`` counts them)."""
    shards = set()
    for row, row_pairs in pairs:
        data = source.get(row)
        if data is None:
            raise ExportError(f"shard {row['shard']} has no image at index {row['index']} ({row['image_key']}): the "
                              "input tar is not the one this output was made from; pass --shards PATH to the right one")
        storage.write_atomic(storage.join(directory, image_path(row)), upright_jpeg(data), s3)
        counts["image_files"] = counts.get("image_files", 0) + 1
        shards.add(row["shard"])
        yield row, row_pairs
    for shard in shards:
        tidy_tmp(storage.join(directory, shard, "x"), s3)


def _refuse_existing(dest: str, s3: S3Options, overwrite: bool) -> None:
    fs, path = storage.filesystem(dest, s3)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound or overwrite:
        return
    if info.type == pafs.FileType.Directory and not fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        return
    raise ExportError(f"{dest} exists; choose another destination or pass --overwrite")


def tidy_tmp(uri: str, s3: S3Options) -> None:
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
        "idx": idx, "image_path": pair["image_path"], "class_id": CLASS_IDS.get(pair["category"], SINGLE),
        "label": pair["expression"],
        "caption": pair["caption"] or "", "box": pair["box"], "segmentation": pair["mask"],
        "shard": pair["shard"], "index": pair["index"], "object": pair["object"], "phrase": pair["phrase"],
        "iou": pair["iou"], "kept": pair["kept"], "reject_reason": pair["reject_reason"], "style": pair["style"],
    }


def write_gseval(pairs, dest: str, s3: S3Options = S3Options()) -> dict:
    counts = {"images": 0, "pairs": 0}
    with storage.open_atomic(dest, s3) as f:
        for _, row_pairs in pairs:
            counts["images"] += 1
            for pair in row_pairs:
                f.write(_line(gseval_record(counts["pairs"], pair)))
                counts["pairs"] += 1
    tidy_tmp(dest, s3)
    return counts


def _tokens(sentence: str) -> list[str]:
    return re.findall(r"[\w']+", sentence.lower())


def write_coco(pairs, dest: str, s3: S3Options = S3Options()) -> dict:
    """COCO instances + refs, written as a stream: images straight to DEST, annotations and refs to local
    temporary files that are appended after them (COCO's JSON keeps each kind in one array)."""
    counts = {"images": 0, "pairs": 0}
    with storage.open_atomic(dest, s3) as f, tempfile.TemporaryFile() as anns, tempfile.TemporaryFile() as refs:
        f.write(b'{"info": {"description": "sculpt export: referring expressions and masks"}, "licenses": [], '
                b'"categories": [{"id": 1, "name": "object", "supercategory": "object"}],\n"images": [')
        for row, row_pairs in pairs:
            counts["images"] += 1
            image_id = counts["images"]
            image = {"id": image_id, "file_name": row_pairs[0]["image_path"], "width": row["width"], "height": row["height"],
                     "shard": row["shard"], "index": row["index"], "image_key": row["image_key"],
                     "sa1b_image_id": row.get("image_id"), "caption": row.get("caption")}
            f.write((b",\n" if image_id > 1 else b"\n") + json.dumps(image, ensure_ascii=False).encode())
            for pair in row_pairs:
                counts["pairs"] += 1
                ann_id = counts["pairs"]
                x0, y0, x1, y1 = pair["box"]
                sep = b",\n" if ann_id > 1 else b"\n"
                anns.write(sep + json.dumps({
                    "id": ann_id, "image_id": image_id, "category_id": 1, "segmentation": pair["mask"],
                    "area": pair["area"], "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
                    "shard": pair["shard"], "index": pair["index"], "object": pair["object"],
                    "phrase": pair["phrase"], "iou": pair["iou"], "kept": pair["kept"], "style": pair["style"],
                }, ensure_ascii=False).encode())
                tokens = _tokens(pair["expression"])
                refs.write(sep + json.dumps({
                    "ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1,
                    "file_name": pair["image_path"], "sent_ids": [ann_id],
                    "sentences": [{"sent_id": ann_id, "raw": pair["expression"], "sent": " ".join(tokens), "tokens": tokens}],
                    "style": pair["style"], "shard": pair["shard"], "index": pair["index"], "object": pair["object"],
                }, ensure_ascii=False).encode())
        for name, part in ((b"annotations", anns), (b"refs", refs)):
            f.write(b'\n],\n"' + name + b'": [')
            part.seek(0)
            shutil.copyfileobj(part, f, 1 << 20)
        f.write(b"\n]}\n")
    tidy_tmp(dest, s3)
    return counts


def write_hf(pairs, dest: str, s3: S3Options = S3Options(), rows_per_file: int = 100_000) -> dict:
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
        for _, row_pairs in pairs:
            counts["images"] += 1
            for pair in row_pairs:
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
    tidy_tmp(storage.join(dest, "x"), s3)
    return counts


def brush_encoder():
    """Label Studio's brush RLE encoder (``label_studio_sdk.converter.brush.mask2rle``) for a boolean mask."""
    try:
        # The package's converter __init__ prints the name of every optional module it lacks; only brush is used.
        with contextlib.redirect_stdout(io.StringIO()):
            from label_studio_sdk.converter import brush
    except ImportError:
        raise ExportError("--format labelstudio needs label-studio-sdk: pip install 'sculpt[export]' (or, beside "
                          "pinned numpy/opencv, pip install --no-deps label-studio-sdk)") from None
    # Label Studio's brush RLE runs over RGBA pixels; mask2rle repeats each value into the four channels.
    return lambda mask: brush.mask2rle(mask.astype(np.uint8) * 255)


def labelstudio_results(pair: dict, encode) -> list[dict]:
    """A pair's brush mask, its expression (a per-region text of that mask) and its box (percent)."""
    width, height = pair["width"], pair["height"]
    region = f"{pair['shard']}:{pair['index']}:{pair['object']}"
    common = {"to_name": "image", "original_width": width, "original_height": height, "image_rotation": 0,
              "meta": {"shard": pair["shard"], "index": pair["index"], "object": pair["object"],
                       "phrase": pair["phrase"], "iou": pair["iou"], "kept": pair["kept"], "style": pair["style"]}}
    results = [
        {**common, "id": region, "from_name": "mask", "type": "brushlabels",
         "value": {"format": "rle", "rle": encode(rle.decode(pair["mask"])), "brushlabels": [LABEL]}},
        {**common, "id": region, "from_name": "expression", "type": "textarea", "value": {"text": [pair["expression"]]}},
    ]
    if pair["box"] is not None:
        x0, y0, x1, y1 = pair["box"]
        results.append({**common, "id": f"{region}:box", "from_name": "box", "type": "rectanglelabels", "value": {
            "x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
            "height": 100 * (y1 - y0) / height, "rotation": 0, "rectanglelabels": [LABEL]}})
    return results


def write_labelstudio(pairs, dest: str, s3: S3Options = S3Options()) -> dict:
    """A JSON array of tasks, written one task at a time."""
    encode = brush_encoder()
    counts = {"images": 0, "pairs": 0}
    with storage.open_atomic(dest, s3) as f:
        f.write(b"[")
        for row, row_pairs in pairs:
            task = {
                "data": {"image": row_pairs[0]["image_path"], "caption": row.get("caption") or "", "shard": row["shard"],
                         "index": row["index"], "image_key": row["image_key"], "image_id": row.get("image_id")},
                "predictions": [{"model_version": "sculpt",
                                 "result": [r for pair in row_pairs for r in labelstudio_results(pair, encode)]}],
            }
            f.write((b",\n" if counts["images"] else b"\n") + json.dumps(task, ensure_ascii=False).encode())
            counts["images"] += 1
            counts["pairs"] += len(row_pairs)
        f.write(b"\n]\n")
    tidy_tmp(dest, s3)
    return counts


WRITERS = {"gseval": write_gseval, "coco": write_coco, "hf": write_hf, "labelstudio": write_labelstudio}


def export(out: str, dest: str, fmt: str, s3: S3Options = S3Options(), keep_all: bool = False, overwrite: bool = False,
           images: str | None = None, image_root: str | None = None, shards: list[str] | None = None,
           seed: int = 0, split=training.SPLIT) -> dict:
    """Export OUT's pairs to DEST in ``fmt``; returns counts of images and pairs written (and image files).

    ``images``: also extract the images to this directory, and reference them there unless ``image_root`` says
    how the records should name it (e.g. Label Studio's ``/data/local-files/?d=`` prefix). ``shards``: where the
    input tars are, when not where the job read them. ``seed``, ``split``: refcoco's train/val/test by image.
    """
    if fmt not in WRITERS and fmt not in training.WRITERS:
        raise ExportError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    if not data_files(out, s3):
        raise ExportError(f"{out}: no sculpt output here (no committed Parquet files)")
    if fmt == "labelstudio":
        brush_encoder()  # fail before writing anything
    _refuse_existing(dest, s3, overwrite)
    if fmt == "hf" and overwrite:
        for name in storage.list_names(dest, s3, ".parquet"):  # a previous export's files, and only those
            fs, path = storage.filesystem(storage.join(dest, name), s3)
            fs.delete_file(path)
    if images and not storage.is_s3(images):
        # the records name the files wherever they are read from: GroundingSuite's evaluator and COCO readers join
        # an image folder of their own to a record's path, which leaves an absolute path as it is
        images = os.path.abspath(images)
    root = image_root if image_root is not None else (images or "")
    if fmt in training.WRITERS:
        items = training.iter_images(out, training.BUILDERS[fmt], s3, keep_all, image_root=root)
        extracted: dict = {}
        if images:
            items = extracting_images(items, images, ShardImages(out, s3, shards), s3, extracted)
        counts = training.WRITERS[fmt](items, dest, s3, seed=seed, split=training.checked_split(split))
        tidy_tmp(storage.join(dest, "x") if fmt == "refcoco" else dest, s3)
        return {**counts, **extracted}
    pairs = iter_pairs(out, s3, keep_all, image_root=root, negatives=fmt == "hf")  # the one format with a place for them
    extracted: dict = {}
    if images:
        pairs = extracting_images(pairs, images, ShardImages(out, s3, shards), s3, extracted)
    return {**WRITERS[fmt](pairs, dest, s3), **extracted}
