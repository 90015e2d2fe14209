"""The output schema: one Parquet row per input image.

Every image a shard holds becomes exactly one row, whatever happened to it: ``status`` is ``ok`` (objects
annotated), ``empty`` (processed, nothing found) or ``error`` (``error`` says what went wrong and where).
Model stages fill ``caption`` and ``objects``; a column a stage has not filled yet is null.

Between stages the rows also carry the columns in ``TRANSIENT_FIELDS`` (the encoded image and the shard's
bookkeeping). They never reach the output files.
"""

from __future__ import annotations

import pyarrow as pa

from sculpt.annotation import rle

MASK_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

OBJECT_TYPE = pa.struct(
    [
        ("phrase", pa.string()),  # the caption phrase that was grounded
        ("phrase_start", pa.int32()),  # its character span in `caption`: caption[start:end] == phrase
        ("phrase_end", pa.int32()),
        # x0, y0, x1, y1 in pixels of the (EXIF-upright) image; null for a negative. A plain list: pyarrow before
        # 26 cannot read a null fixed-size list inside a list of structs ("Expected all lists to be of size=4"), as
        # older sculpt outputs have them (fixed_size_list<float32>[4]; same values, read and resumed as this)
        ("box", pa.list_(pa.float32())),
        ("mask", MASK_TYPE),  # COCO compressed RLE from pycocotools; sculpt.schema.decode_masks decodes it
        ("area", pa.int64()),  # mask pixels
        ("mask_score", pa.float32()),  # the masker's predicted IoU
        ("expression", pa.string()),  # referring expression for this object
        ("expression_words", pa.int32()),
        ("iou", pa.float32()),  # IoU of the verifier's mask (from `expression` alone) with `mask`
        # the verifier mask's highest IoU with any other object of the image (its own members and groups aside)
        ("rival_iou", pa.float32()),
        # how many instances of its kind the image holds (named or not; the instances stage, actors/instances.py);
        # null for stuff, negatives, a job without that stage and outputs of sculpt before it
        ("instances", pa.int32()),
        ("verifier_area", pa.int64()),  # pixels of the verifier's mask
        # the listener's box for `expression` alone (actors/listen.py) against `box`: box IoU; null where it was not
        # asked (negatives, pairs the text checks reject, a job without the listen stage, older outputs)
        ("listener_iou", pa.float32()),
        ("verifier_mask", MASK_TYPE),  # the verifier's mask itself, with the verify stage's keep_masks
        # kept: the pair passed every check of the verify stage's keep rule (sculpt.annotation.verify.CHECKS)
        ("kept", pa.bool_()),
        # the first check it failed (no_expression, too_short, ..., low_iou, rival, negative_drawn); null when kept.
        # Outputs of sculpt before schema version 4 lack the field; their readers here take it as null
        ("reject_reason", pa.string()),
        ("category", pa.string()),  # stuff | part | single | multi | negative (sculpt.annotation.categories, sculpt.annotation.groups)
        ("members", pa.list_(pa.int32())),  # a multi-object group: its members' indices in `objects`
        # how the expression names the object: plain (the refer prompt: how it looks and where it is) or reasoning (by
        # what it is for or what one knows about it; sculpt.annotation.reasoning); null: outputs before schema version 5
        ("style", pa.string()),
        # a reasoning pair: the index in `objects` of the object it names (same mask, box and category); else null
        ("target", pa.int32()),
        ("error", pa.string()),  # an object-level failure; null when fine
    ]
)

# A caption span and the objects (indices in `objects`) grounded to it
SPAN_TYPE = pa.struct([("start", pa.int32()), ("end", pa.int32()), ("objects", pa.list_(pa.int32()))])
# A grounded chat turn (sculpt.annotation.chat): a question, its answer and the answer's spans that name objects
TURN_TYPE = pa.struct([("question", pa.string()), ("answer", pa.string()), ("spans", pa.list_(SPAN_TYPE))])

OUTPUT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),  # the shard file's stem (e.g. sa_000123)
        ("index", pa.int32()),  # position of the image in its shard
        ("image_key", pa.string()),  # tar member stem, e.g. sa_223750; empty for a shard-level error
        ("image_id", pa.int64()),  # SA-1B image_id from the json; null when unknown
        ("file_name", pa.string()),
        ("width", pa.int32()),  # after EXIF orientation
        ("height", pa.int32()),
        ("status", pa.string()),  # ok | empty | error
        ("error", pa.string()),
        ("caption", pa.string()),
        ("grounded_caption", pa.list_(SPAN_TYPE)),  # the caption's grounded spans, in order, with their objects
        # grounded chat turns about the image's kept objects (the chat stage); null: not asked (no kept object, a job
        # without the stage, outputs before schema version 5)
        ("chat", pa.list_(TURN_TYPE)),
        ("objects", pa.list_(OBJECT_TYPE)),
        ("source_annotations", pa.string()),  # SA-1B's own annotations as JSON, only with input.keep_source_annotations
    ]
)

# What a reader knows once it has read a unit (a chunk of a shard) to its end: its size, and where the next begins
UNIT_END_TYPE = pa.struct([
    ("size", pa.int32()),  # rows the unit yields
    ("bytes_read", pa.int64()),  # input bytes read for it
    ("offset", pa.int64()),  # tar offset of its first member
    ("members", pa.int64()),  # tar members before it
    ("index", pa.int32()),  # its first image index
    ("next_offset", pa.int64()),  # tar offset of the next chunk's first member (uncompressed tars seek here)
    ("next_members", pa.int64()),  # tar members before the next chunk (compressed tars skip these)
    ("next_index", pa.int32()),  # the next chunk's first image index
    ("last", pa.bool_()),  # this unit ends the shard
])

TRANSIENT_FIELDS = [
    pa.field("image_bytes", pa.binary()),  # the encoded image as it came from the tar
    pa.field("unit", pa.string()),  # the output unit (a chunk of the shard) the row belongs to, e.g. sa_000123-00002
    pa.field("unit_end", UNIT_END_TYPE),  # set on the rows of a unit's last batch only
    # set when a transient fault outlasted its retries (sculpt/errors.py): the row's unit is not committed
    pa.field("transient_error", pa.string()),
    # each stage's busy time spent on this row (its batch's time over the batch's rows), for run statistics
    pa.field("stage_seconds", pa.list_(pa.struct([("stage", pa.string()), ("seconds", pa.float64())]))),
]
PIPELINE_SCHEMA = pa.schema(list(OUTPUT_SCHEMA) + TRANSIENT_FIELDS)

OK, EMPTY, ERROR = "ok", "empty", "error"


def new_row(shard: str, index: int, image_key: str, **fields) -> dict:
    """A row with every pipeline column present (unset ones null)."""
    row = dict.fromkeys(PIPELINE_SCHEMA.names)
    row.update(shard=shard, index=index, image_key=image_key, status=OK, objects=[])
    unknown = set(fields) - set(row)
    if unknown:
        raise KeyError(f"not schema columns: {sorted(unknown)}")
    row.update(fields)
    return row


def new_object(**fields) -> dict:
    """An object with every field present (unset ones null)."""
    obj = dict.fromkeys(OBJECT_TYPE.names)
    unknown = set(fields) - set(obj)
    if unknown:
        raise KeyError(f"not object fields: {sorted(unknown)}")
    obj.update(fields)
    return obj


def mark_error(row: dict, where: str, exc: BaseException | str) -> dict:
    """Record a failure on the row; the row travels on and is written with status=error."""
    message = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    row["status"], row["error"] = ERROR, f"{where}: {message}"
    return row


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PIPELINE_SCHEMA)


def decode_masks(row: dict):
    """The row's object masks as an N×H×W bool array (N may be 0)."""
    import numpy as np

    masks = [rle.decode(obj["mask"]) for obj in row.get("objects") or [] if obj.get("mask")]
    if not masks:
        return np.zeros((0, row.get("height") or 0, row.get("width") or 0), dtype=bool)
    return np.stack(masks)
