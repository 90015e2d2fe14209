"""``sculpt export --format gcg|refcoco|llava``: the output in the layouts that pixel-grounding models train on.

Each format is matched to the loader of its own project, and ``tests/test_training_exports.py`` reads the
exports with those loaders' reading lines:

- ``gcg``: GLaMM's grounded-caption annotations, one JSON array (groundingLMM ``dataset/gcg_datasets/
  GranDf_gcg_ds.py``, ``GCGBaseDataset``): per image ``file_name``, ``caption`` and ``groundings`` =
  ``{phrase: {"token_positives": [start, end], "rle_masks": [RLE]}}``. The loader strips the caption of quotes and
  blanks, sums each phrase's ``rle_masks`` and tags the caption as ``<p> phrase </p> [SEG]``: sculpt writes the
  caption as that strip leaves it (spans shifted to it), one mask per phrase (the union of its objects: a sum of
  several could count a pixel twice), phrases that do not overlap, and a repeated phrase's key with `` (2)``,
  `` (3)`` … (a JSON object holds a key once). Each grounding also names its ``objects`` (positions in the
  row's ``objects``).
- ``refcoco``: a folder ``DEST`` with ``instances.json`` (COCO: ``images``, ``annotations`` with ``segmentation`` a
  *list* of one RLE, xywh ``bbox``; categories sculpt's kinds 1 stuff, 2 part, 3 multi, 4 single) and
  ``refs(sculpt).p`` (a pickled list of refs: ``ref_id``, ``ann_id``, ``image_id``, ``category_id``, ``split``,
  ``sent_ids``, ``sentences`` with ``raw``, ``sent``, ``tokens``), as ``REFER(data_root, dataset, "sculpt")``
  reads them from ``data_root/dataset/`` (lichengunc/refer ``refer.py``; LISA's ``utils/refer.py`` and
  ``refer_seg_dataset.py`` read the list-of-RLE segmentation). Each image falls in ``train``, ``val`` or ``test``
  by a hash of (seed, shard, index) against the fractions ``split``: stable across runs, whatever else the output
  holds. The pickle is protocol 2 (Python 2's refer.py reads it too), streamed a thousand refs at a time.
- ``llava``: one JSON array of LLaVA conversations (``id``, ``image``, ``conversations`` of ``{"from": "human" |
  "gpt", "value"}``, ``<image>`` opening the first turn, as LISA's ``utils/vqa_dataset.py`` and LLaVA read them),
  every grounded phrase of an answer marked ``[SEG]`` (LISA's and GLaMM's mask token) and ``masks`` beside the
  conversation: one RLE per ``[SEG]``, in order; ``turns`` says per question-answer pair its ``kind``, ``objects``
  and the ``masks`` it uses. Per image a ``refer`` conversation (each referring pair: the expression asked for, the
  answer ``Sure, it is [SEG].``; each negative: the answer says it is not in the image) and a ``caption``
  conversation (the grounded caption as a detailed description, ``<p> phrase </p> [SEG]`` per grounded phrase).

Issue 30's other kinds: reasoning references are objects with ``style: reasoning``: ``refer_turns`` gives them
``QUESTIONS["reasoning"]`` and they join the ``refer`` conversation and the refcoco refs as they are (an annotation
says its ``style``); grounded chat turns (the row's ``chat``: spans → objects per answer) become more turns of the
``caption`` conversation (``caption_conversation``, kind ``chat``) and more GCG records (``gcg_records``, kind
``chat``, ``question`` beside ``caption``). Outputs without these fields (schema version 4) export as before.

Kept pairs only by default (``keep_all``: every pair); a grounded phrase is exported when the group it names, or
else every object it names, is kept. Records name ``shard``, ``index`` and the objects they come from. Rows are
read a record batch at a time; DEST may be local or ``s3://``, and each file appears whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from sculpt.annotation import groups, rle
from sculpt.annotation.categories import CLASS_IDS, NAMES, NEGATIVE, SINGLE
from sculpt.io import storage
from sculpt.io.storage import S3Options
from sculpt import schema
from sculpt.outputs.pairs import READ_COLUMNS, ExportError, data_files, image_path, style_of

FORMATS = ("gcg", "refcoco", "llava")
SPLIT = (0.8, 0.1, 0.1)  # train, val, test: fractions of the images
SPLIT_NAMES = ("train", "val", "test")
SPLIT_BY = "sculpt"  # refs(<splitBy>).p
SEG = "[SEG]"
IMAGE = "<image>"
QUESTIONS = {"refer": "Please segment {expression}.", "reasoning": "{expression} Please output the segmentation mask.",
             "caption": "Could you describe the image in detail? Please segment each thing you name."}
ANSWERS = {"refer": f"Sure, it is {SEG}.", "negative": "It is not in this image."}
REFS_PER_BATCH = 1000


# --- reading --------------------------------------------------------------------------------------------------------

def iter_rows(out: str, s3: S3Options = S3Options(), batch_size: int = 256):
    """The output's rows with their grounded caption (derived from the objects for outputs without the column),
    shard after shard, each in index order, one batch of rows in memory at a time."""
    fs, _ = storage.filesystem(out, s3)
    for path in data_files(out, s3):
        dataset = pads.dataset(path, format="parquet", filesystem=fs)
        columns = READ_COLUMNS + [c for c in ("grounded_caption", "chat") if c in dataset.schema.names]
        order = np.argsort(dataset.to_table(columns=["index"])["index"].to_numpy(), kind="stable")
        for start in range(0, len(order), batch_size):
            for row in dataset.take(pa.array(order[start:start + batch_size]), columns=columns).to_pylist():
                if row.get("grounded_caption") is None:
                    row["grounded_caption"] = groups.grounded_caption(row.get("objects") or [])
                yield row


def exportable(row: dict, keep_all: bool = False) -> dict[int, dict]:
    """position -> object for the row's objects a training export may use: a mask (a negative: an expression),
    no error, kept (unless ``keep_all``)."""
    if row.get("status") != schema.OK:
        return {}
    found = {}
    for position, obj in enumerate(row.get("objects") or []):
        if obj.get("error") or not (keep_all or obj.get("kept") is True):
            continue
        if obj.get("category") == NEGATIVE:
            if obj.get("expression"):
                found[position] = obj
        elif obj.get("mask") and (obj["area"] if obj.get("area") is not None else rle.area(obj["mask"])) > 0:
            found[position] = obj
    return found


def iter_images(out: str, build, s3: S3Options = S3Options(), keep_all: bool = False, image_root: str = ""):
    """(row, records) for each row that ``build(row, objects)`` gives records; ``row["image_path"]`` is set."""
    for row in iter_rows(out, s3):
        objects = exportable(row, keep_all)
        row["image_path"] = image_path(row, image_root)
        records = build(row, objects) if objects else []
        if records:
            yield row, records


def _rle(mask: dict) -> dict:
    return {"size": [int(v) for v in mask["size"]], "counts": mask["counts"]}


def _where(row: dict) -> dict:
    return {"shard": row["shard"], "index": row["index"], "image_key": row["image_key"]}


# --- grounded phrases -----------------------------------------------------------------------------------------------

def grounded_phrases(caption: str | None, spans: list[dict], all_objects: list[dict],
                     objects: dict[int, dict]) -> tuple[str, list[dict]]:
    """A grounded text (the caption and its spans; later a grounded chat answer and its own) stripped of the quotes
    and blanks GLaMM's loader strips, and its exported phrases in order, none overlapping: ``start``, ``end`` (in
    the stripped text), ``objects`` (positions in ``all_objects``, the row's) and ``mask`` (their union).

    A phrase that names a group exports the group (when it is exportable); any other phrase exports only when
    every object it names is exportable (in ``objects``)."""
    caption = text = caption or ""
    while text != text.strip('"').strip():  # the loader strips once: write what one strip leaves alone
        text = text.strip('"').strip()
    shift = caption.find(text) if text else 0
    phrases, end_before = [], 0
    for span in spans or []:
        named = list(span["objects"] or [])
        grouped = [i for i in named if all_objects[i].get("members")]
        chosen = grouped[:1] or named
        if not chosen or any(i not in objects or objects[i].get("category") == NEGATIVE for i in chosen):
            continue
        start, end = span["start"] - shift, span["end"] - shift
        if start < end_before or end > len(text) or start >= end:
            continue  # outside the stripped caption, or overlapping the phrase before it
        masks = [objects[i]["mask"] for i in chosen]
        mask = masks[0] if len(masks) == 1 else rle.union(masks)
        phrases.append({"start": start, "end": end, "objects": chosen, "mask": _rle(mask)})
        end_before = end
    return text, phrases


def tagged(text: str, phrases: list[dict]) -> str:
    """The text with each phrase marked ``<p> phrase </p> [SEG]`` (GLaMM's tagging), phrases in order."""
    out, at = [], 0
    for p in phrases:
        out += [text[at:p["start"]], f"<p> {text[p['start']:p['end']]} </p> {SEG}"]
        at = p["end"]
    return "".join(out + [text[at:]])


# --- gcg ------------------------------------------------------------------------------------------------------------

def gcg_record(row: dict, text: str, phrases: list[dict], kind: str, question: str | None = None) -> dict:
    groundings, seen = {}, {}
    for p in phrases:
        word = text[p["start"]:p["end"]]
        seen[word] = seen.get(word, 0) + 1
        key = word if seen[word] == 1 else f"{word} ({seen[word]})"
        groundings[key] = {"token_positives": [p["start"], p["end"]], "rle_masks": [p["mask"]], "objects": p["objects"]}
    record = {"file_name": row["image_path"], "width": row["width"], "height": row["height"], "kind": kind,
              "caption": text, "groundings": groundings, **_where(row)}
    return record if question is None else {**record, "question": question}


def chat_turns(row: dict, objects: dict[int, dict]) -> list[tuple[str, str, list[dict]]]:
    """(question, answer, exported phrases) of each grounded chat turn of the row with a phrase to export."""
    turns = []
    for turn in row.get("chat") or []:
        text, phrases = grounded_phrases(turn["answer"], turn["spans"], row["objects"], objects)
        if phrases:
            turns.append((turn["question"], text, phrases))
    return turns


def gcg_records(row: dict, objects: dict[int, dict]) -> list[dict]:
    """The image's grounded caption as a GCG record, then one record per grounded chat turn (``question`` beside)."""
    text, phrases = grounded_phrases(row.get("caption"), row["grounded_caption"], row["objects"], objects)
    records = [gcg_record(row, text, phrases, "caption")] if phrases else []
    return records + [gcg_record(row, answer, found, "chat", question=question)
                      for question, answer, found in chat_turns(row, objects)]


# --- llava ----------------------------------------------------------------------------------------------------------

def _expression(obj: dict) -> str:
    return obj["expression"].strip().rstrip(".")


def refer_turns(objects: dict[int, dict]) -> list[tuple[str, str, dict, list[dict]]]:
    """(question, answer, turn, masks) for each referring pair (one mask) and negative (none) of the image."""
    turns = []
    for position, obj in objects.items():
        if not obj.get("expression"):
            continue
        if obj.get("category") == NEGATIVE:
            kind, question, answer, masks = "negative", QUESTIONS["refer"], ANSWERS["negative"], []
        else:
            kind = "reasoning" if obj.get("style") == "reasoning" else "refer"
            question, answer, masks = QUESTIONS[kind], ANSWERS["refer"], [obj["mask"]]
        turn = {"kind": kind, "objects": [position], "expression": obj["expression"]}
        turns.append((question.format(expression=_expression(obj)), answer, turn, masks))
    return turns


def conversation(row: dict, kind: str, turns: list[tuple[str, str, dict, list[dict]]]) -> dict:
    """A LLaVA conversation of (question, answer, turn, masks): ``<image>`` opens the first question, each answer
    holds one ``[SEG]`` per mask, ``masks`` lists them in that order and ``turns`` says which turn uses which."""
    messages, masks, meta = [], [], []
    for n, (question, answer, turn, turn_masks) in enumerate(turns):
        if answer.count(SEG) != len(turn_masks):
            raise ValueError(f"{answer.count(SEG)} {SEG} marks for {len(turn_masks)} masks")
        messages += [{"from": "human", "value": f"{IMAGE}\n{question}" if n == 0 else question},
                     {"from": "gpt", "value": answer}]
        meta.append({**turn, "masks": list(range(len(masks), len(masks) + len(turn_masks)))})
        masks += [_rle(m) for m in turn_masks]
    return {"id": f"{row['shard']}:{row['index']}:{kind}", "image": row["image_path"], "width": row["width"],
            "height": row["height"], **_where(row), "kind": kind, "conversations": messages, "masks": masks,
            "turns": meta}


def caption_conversation(row: dict, objects: dict[int, dict]) -> dict | None:
    """The grounded caption as a detailed-description turn, then the grounded chat turns (kind ``chat``)."""
    text, phrases = grounded_phrases(row.get("caption"), row["grounded_caption"], row["objects"], objects)
    turns = [(QUESTIONS["caption"], text, phrases, "caption")] if phrases else []
    turns += [(question, answer, found, "chat") for question, answer, found in chat_turns(row, objects)]
    if not turns:
        return None
    return conversation(row, "caption", [
        (question, tagged(answer, found), {"kind": kind, "objects": [p["objects"] for p in found],
                                           "spans": [[p["start"], p["end"]] for p in found]}, [p["mask"] for p in found])
        for question, answer, found, kind in turns])


def llava_records(row: dict, objects: dict[int, dict]) -> list[dict]:
    turns = refer_turns(objects)
    records = [conversation(row, "refer", turns)] if turns else []
    caption = caption_conversation(row, objects)
    return records + ([caption] if caption else [])


# --- refcoco --------------------------------------------------------------------------------------------------------

def refcoco_pairs(row: dict, objects: dict[int, dict]) -> list[tuple[int, dict]]:
    """(position, object) of the image's referring pairs: a mask and an expression (negatives have no place)."""
    return [(p, o) for p, o in objects.items() if o.get("expression") and o.get("category") != NEGATIVE]


def checked_split(split) -> tuple[float, float, float]:
    """(train, val, test) fractions from a sequence or ``"0.8,0.1,0.1"``; any scale, normalised when used."""
    try:
        values = tuple(float(v) for v in (split.split(",") if isinstance(split, str) else split))
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise ExportError(f"split {split!r}: three fractions train,val,test (e.g. 0.8,0.1,0.1), none negative")
    return values


def split_of(row: dict, seed: int = 0, split=SPLIT) -> str:
    """The image's split: a hash of (seed, shard, index) against the fractions, the same on every run."""
    digest = hashlib.sha256(f"{seed}\0{row['shard']}\0{row['index']}".encode()).digest()
    u, total, bound = int.from_bytes(digest[:8], "big") / 2 ** 64, float(sum(split)), 0.0
    for name, fraction in zip(SPLIT_NAMES, split):
        bound += fraction / total
        if u < bound:
            return name
    return SPLIT_NAMES[-1]


def tokens(sentence: str) -> list[str]:
    return re.findall(r"[\w']+", sentence.lower())


def _pickled(obj) -> bytes:
    """One object's protocol-2 pickle opcodes without the header and STOP, to append to a stream: no memo (the
    pickler's fast mode; a ref is a tree), so that no two refs name the same memo entry."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.fast = True
    pickler.dump(obj)
    return buffer.getvalue()[2:-1]


def write_refcoco(items, dest: str, s3: S3Options = S3Options(), seed: int = 0, split=SPLIT) -> dict:
    """``DEST/instances.json`` (images to DEST as they come, annotations to a local temporary file appended
    after them) and ``DEST/refs(sculpt).p`` (a pickled list written in batches of appends)."""
    counts = {"images": 0, "pairs": 0, **{name: 0 for name in SPLIT_NAMES}}
    categories = [{"id": i, "name": name, "supercategory": "object"} for i, name in sorted(NAMES.items())]
    with storage.open_atomic(storage.join(dest, "instances.json"), s3) as f, \
            storage.open_atomic(storage.join(dest, f"refs({SPLIT_BY}).p"), s3) as refs, \
            tempfile.TemporaryFile() as anns:
        f.write(b'{"info": {"description": "sculpt export: referring expressions and masks"}, "licenses": [], '
                b'"categories": ' + json.dumps(categories).encode() + b',\n"images": [')
        refs.write(b"\x80\x02]")  # PROTO 2, EMPTY_LIST
        batch: list[bytes] = []
        for row, pairs in items:
            counts["images"] += 1
            image_id, which = counts["images"], split_of(row, seed, split)
            counts[which] += 1
            image = {"id": image_id, "file_name": row["image_path"], "width": row["width"], "height": row["height"],
                     "split": which, "sa1b_image_id": row.get("image_id"), "caption": row.get("caption"), **_where(row)}
            f.write((b",\n" if image_id > 1 else b"\n") + json.dumps(image, ensure_ascii=False).encode())
            for position, obj in pairs:
                counts["pairs"] += 1
                ann_id = counts["pairs"]
                category_id = CLASS_IDS.get(obj.get("category"), SINGLE)
                mask = _rle(obj["mask"])
                x0, y0, x1, y1 = [float(v) for v in obj["box"]] if obj.get("box") is not None else [0.0] * 4
                trace = {"shard": row["shard"], "index": row["index"], "object": position}
                anns.write((b",\n" if ann_id > 1 else b"\n") + json.dumps({
                    "id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": [mask],
                    "area": obj.get("area") if obj.get("area") is not None else rle.area(mask),
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0, "phrase": obj.get("phrase"),
                    "iou": obj.get("iou"), "kept": obj.get("kept"), "members": obj.get("members"),
                    "style": style_of(obj), "target": obj.get("target"), **trace,
                }, ensure_ascii=False).encode())
                words = tokens(obj["expression"])
                batch.append(_pickled({
                    "ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "category_id": category_id,
                    "split": which, "file_name": row["image_path"], "sent_ids": [ann_id],
                    "sentences": [{"sent_id": ann_id, "raw": obj["expression"], "sent": " ".join(words),
                                   "tokens": words}], **trace}))
            if len(batch) >= REFS_PER_BATCH:
                refs.write(b"(" + b"".join(batch) + b"e")  # MARK, the refs, APPENDS
                batch.clear()
        if batch:
            refs.write(b"(" + b"".join(batch) + b"e")
        refs.write(b".")
        f.write(b'\n],\n"annotations": [')
        anns.seek(0)
        while chunk := anns.read(1 << 20):
            f.write(chunk)
        f.write(b"\n]}\n")
    return counts


# --- json arrays ----------------------------------------------------------------------------------------------------

def write_array(items, dest: str, s3: S3Options = S3Options(), **_) -> dict:
    """One JSON array of every item's records, written one record at a time."""
    counts = {"images": 0, "pairs": 0, "records": 0}
    with storage.open_atomic(dest, s3) as f:
        f.write(b"[")
        for _, records in items:
            counts["images"] += 1
            for record in records:
                f.write((b",\n" if counts["records"] else b"\n") + json.dumps(record, ensure_ascii=False).encode())
                counts["records"] += 1
                # llava: its question-answer turns; gcg: its grounded phrases
                counts["pairs"] += len(record["turns"]) if "turns" in record else len(record["groundings"])
        f.write(b"\n]\n")
    return counts


BUILDERS = {"gcg": gcg_records, "refcoco": refcoco_pairs, "llava": llava_records}
WRITERS = {"gcg": write_array, "refcoco": write_refcoco, "llava": write_array}
