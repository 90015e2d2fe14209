"""sculpt export --format gcg|refcoco|llava, each read back the way its own project's loader reads it.

The loaders' reading lines are re-done here, minimal and faithful (their projects are not pip-installable):
GLaMM's ``GCGBaseDataset`` (groundingLMM dataset/gcg_datasets/GranDf_gcg_ds.py), the ``refer`` API's ``REFER``
(lichengunc/refer refer.py; LISA's utils/refer.py and utils/refer_seg_dataset.py for the RLE list) and LISA's
``VQADataset`` (utils/vqa_dataset.py) for LLaVA conversations.
"""

import io
import json
import os
import pickle
import pickletools

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from sculpt import cli, schema
from sculpt.annotation import groups, rle
from sculpt.io import storage
from sculpt.outputs import export, training
from sculpt.outputs.store import OutputStore
from sculpt.outputs.units import UnitWriter
from sculpt.testing import samples

JOB = {"fingerprint": "f", "settings": {}, "model_ids": {}, "prompts_version": "p1", "total_shards": 2}
H, W = 12, 16
CAPTION = ' "A red cup and two plates near a red cup on a table."'


def box_mask(x0, y0, x1, y1, size=(H, W)):
    m = np.zeros(size, bool)
    m[y0:y1, x0:x1] = True
    return m


def thing(box, expression, kept=True, phrase=None, caption=CAPTION, occurrence=0, category="single", size=(H, W)):
    m = box_mask(*box, size=size)
    o = schema.new_object(box=[float(v) for v in box], mask=rle.encode(m), area=int(m.sum()), expression=expression,
                          kept=kept, iou=0.9 if kept else 0.2, category=category)
    if phrase:
        start = caption.find(phrase)
        for _ in range(occurrence):
            start = caption.find(phrase, start + 1)
        o.update(phrase=phrase, phrase_start=start, phrase_end=start + len(phrase))
    return o


def negative(expression="a yellow umbrella", kept=True):
    return schema.new_object(expression=expression, category="negative", mask=rle.empty(H, W), area=0, kept=kept)


def image_objects():
    objects = [thing((1, 1, 4, 5), "the red cup on the left", phrase="red cup"),
               thing((5, 1, 9, 5), "the upper plate", phrase="two plates"),
               thing((5, 6, 9, 10), "the lower plate", kept=False, phrase="two plates"),
               None,
               thing((11, 1, 14, 5), "the red cup on the right", phrase="red cup", occurrence=1),
               negative(),
               thing((0, 10, 3, 12), "the dim shadow", kept=False),
               thing((0, 0, 16, 12), "the table", kept=False, phrase="table", category="stuff")]
    union = rle.union([objects[1]["mask"], objects[2]["mask"]])
    objects[3] = {**schema.new_object(phrase="two plates", phrase_start=objects[1]["phrase_start"],
                                      phrase_end=objects[1]["phrase_end"], box=[5.0, 1.0, 9.0, 10.0], mask=union,
                                      area=rle.area(union), expression="both plates", kept=True, iou=0.8,
                                      category="multi"), "members": [1, 2]}
    return objects


def unit_rows(unit):
    objects = image_objects()
    a = schema.new_row(unit, 0, f"{unit}_a", image_id=1, width=W, height=H, caption=CAPTION, objects=objects,
                       grounded_caption=groups.grounded_caption(objects))
    b = schema.mark_error(schema.new_row(unit, 1, f"{unit}_b"), "read", "cut off")
    c = schema.new_row(unit, 2, f"{unit}_c", width=W, height=H, status=schema.EMPTY)
    # an output without the grounded_caption column's value: the spans come from the objects
    d = schema.new_row(unit, 3, f"{unit}_d", width=W, height=H, caption="a mug.",
                       objects=[thing((2, 2, 6, 6), "the mug", phrase="mug", caption="a mug."),
                                negative("a green bottle"), negative("a purple hat", kept=False)])
    rows = [a, b, c, d]
    for row in rows:
        row["unit_end"] = {"size": len(rows), "bytes_read": 10}
    return rows


def write_output(root, units, make_rows=unit_rows, s3=storage.S3Options()):
    store = OutputStore(root, s3)
    store.prepare(JOB)
    for unit in units:
        writer = UnitWriter(store, unit, JOB, flush_rows=2)
        writer.add(schema.to_table(make_rows(unit)))
        writer.commit()
    return root


@pytest.fixture
def out(tmp_path):
    return write_output(str(tmp_path / "out"), ("sa_000000", "sa_000001"))


def output_rows(out):
    """(shard, index) -> row, straight from the Parquet files."""
    import pyarrow.parquet as pq

    return {(r["shard"], r["index"]): r for name in ("sa_000000", "sa_000001")
            for r in pq.read_table(f"{out}/{name}.parquet").to_pylist()}


def object_masks(row):
    """position -> mask, from ``schema.decode_masks`` (which skips objects without a mask)."""
    decoded = iter(schema.decode_masks(row))
    return {i: next(decoded) for i, o in enumerate(row["objects"]) if o.get("mask")}


# --- GLaMM's GCG loader (GCGBaseDataset._parse_annotations, create_conversations' tag_caption) -------------------

def glamm_gcg(ann_file, image_folder="", open_images=False):
    from PIL import Image

    with open(ann_file, "r") as f:
        data_infos = json.load(f)
    loaded = []
    for ann_info in data_infos:
        image_path = os.path.join(image_folder, ann_info["file_name"])
        if open_images:
            width, height = Image.open(image_path).size
        else:  # no image files in this test: the record's own size (checked against the images below)
            width, height = ann_info["width"], ann_info["height"]
        annotations = {"labels": [], "caption": ann_info["caption"].strip('"').strip(), "masks": [],
                       "tokens_positive": []}
        for word, grounding in ann_info["groundings"].items():
            annotations["labels"].append(word)
            annotations["tokens_positive"].append(grounding["token_positives"])
            binary_mask = np.zeros((height, width), dtype=np.uint8)
            for r in grounding["rle_masks"]:
                binary_mask += coco_mask.decode(r).astype(np.uint8).squeeze()
            annotations["masks"].append(binary_mask)
        caption = annotations["caption"]
        for start, end in sorted(annotations["tokens_positive"], key=lambda x: x[0], reverse=True):
            caption = f"{caption[:start]}<p> {caption[start:end]} </p> [SEG]{caption[end:]}"
        loaded.append({**annotations, "tagged": caption, "info": ann_info})
    return loaded


def test_gcg_loads_in_glamms_reader_with_the_phrase_masks(out, tmp_path):
    dest = str(tmp_path / "gcg" / "gcg.json")
    assert cli.main(["export", out, dest, "--format", "gcg"]) == 0
    loaded = glamm_gcg(dest)
    rows = output_rows(out)
    assert [(a["info"]["shard"], a["info"]["index"]) for a in loaded] == [
        ("sa_000000", 0), ("sa_000000", 3), ("sa_000001", 0), ("sa_000001", 3)]
    first = loaded[0]
    caption = CAPTION.strip().strip('"').strip()
    assert first["caption"] == first["info"]["caption"] == caption
    # the table's only object was rejected: not grounded; the second "red cup" keyed apart from the first
    assert first["labels"] == ["red cup", "two plates", "red cup (2)"]
    assert first["tagged"] == ("A <p> red cup </p> [SEG] and <p> two plates </p> [SEG] near a <p> red cup </p> [SEG] "
                               "on a table.")
    for a in loaded:
        row = rows[(a["info"]["shard"], a["info"]["index"])]
        masks = object_masks(row)
        for label, (start, end), m, grounding in zip(a["labels"], a["tokens_positive"], a["masks"],
                                                     a["info"]["groundings"].values()):
            assert label.split(" (")[0] == a["caption"][start:end]
            expected = np.logical_or.reduce([masks[i] for i in grounding["objects"]])
            assert m.max() == 1 and np.array_equal(m.astype(bool), expected)
    plates = first["info"]["groundings"]["two plates"]
    assert plates["objects"] == [3]  # the group, whose mask is both plates though one plate's own pair was rejected
    assert np.array_equal(first["masks"][1].astype(bool), object_masks(rows[("sa_000000", 0)])[3])
    assert loaded[1]["tagged"] == "a <p> mug </p> [SEG]."  # spans from the objects: no grounded_caption stored


def test_gcg_all_grounds_rejected_objects_too(out, tmp_path):
    dest = str(tmp_path / "gcg.json")
    counts = export.export(out, dest, "gcg", keep_all=True)
    assert counts == {"images": 4, "pairs": 10, "records": 4}
    assert list(glamm_gcg(dest)[0]["info"]["groundings"]) == ["red cup", "two plates", "red cup (2)", "table"]


# --- the refer API (REFER.__init__, createIndex, getRefIds, getMask) --------------------------------------------------

class Refer:
    def __init__(self, data_root, dataset="refcoco", splitBy="unc"):
        data_dir = os.path.join(data_root, dataset)
        self.data = {"dataset": dataset, "refs": pickle.load(open(os.path.join(data_dir, f"refs({splitBy}).p"), "rb"))}
        instances = json.load(open(os.path.join(data_dir, "instances.json"), "rb"))
        self.data.update(images=instances["images"], annotations=instances["annotations"],
                         categories=instances["categories"])
        self.Anns = {ann["id"]: ann for ann in self.data["annotations"]}
        self.Imgs = {img["id"]: img for img in self.data["images"]}
        self.Cats = {cat["id"]: cat["name"] for cat in self.data["categories"]}
        self.Refs, self.refToAnn, self.imgToRefs, self.Sents = {}, {}, {}, {}
        for ref in self.data["refs"]:
            self.Refs[ref["ref_id"]] = ref
            self.imgToRefs[ref["image_id"]] = self.imgToRefs.get(ref["image_id"], []) + [ref]
            self.refToAnn[ref["ref_id"]] = self.Anns[ref["ann_id"]]
            for sent in ref["sentences"]:
                self.Sents[sent["sent_id"]] = sent

    def getRefIds(self, split=""):
        refs = self.data["refs"]
        if split == "test":
            refs = [ref for ref in refs if "test" in ref["split"]]
        elif split in ("train", "val"):
            refs = [ref for ref in refs if ref["split"] == split]
        return [ref["ref_id"] for ref in refs]

    def getImgIds(self, ref_ids):
        return list({self.Refs[ref_id]["image_id"] for ref_id in ref_ids})

    def getMask(self, ref):
        ann = self.refToAnn[ref["ref_id"]]
        image = self.Imgs[ref["image_id"]]
        if type(ann["segmentation"][0]) == list:  # polygon
            r = coco_mask.frPyObjects(ann["segmentation"], image["height"], image["width"])
        else:
            r = ann["segmentation"]
            for i in range(len(r)):  # LISA's refer_seg_dataset.py
                if not isinstance(r[i]["counts"], bytes):
                    r[i]["counts"] = r[i]["counts"].encode()
        m = np.sum(coco_mask.decode(r), axis=2).astype(np.uint8)
        return {"mask": m, "area": sum(coco_mask.area(r))}


def many_rows(unit, images=12):
    rows = []
    for i in range(images):
        objects = [thing((1 + i % 5, 1, 9, 8), f"the thing number {i}", phrase="thing", caption="a thing")]
        rows.append(schema.new_row(unit, i, f"{unit}_{i}", width=W, height=H, caption="a thing", objects=objects,
                                   unit_end={"size": images, "bytes_read": 1}))
    return rows


def test_refcoco_loads_in_the_refer_api_with_the_same_masks_expressions_and_splits(out, tmp_path):
    dest = str(tmp_path / "data" / "refcoco")
    assert cli.main(["export", out, dest, "--format", "refcoco", "--seed", "3"]) == 0
    assert sorted(os.listdir(dest)) == ["instances.json", "refs(sculpt).p"]
    refer = Refer(str(tmp_path / "data"), "refcoco", "sculpt")
    rows = output_rows(out)
    # per image a: cup, upper plate, group, right cup (kept, not negative); d: the mug
    assert len(refer.Refs) == 10 and len(refer.Imgs) == 4
    assert refer.Cats == {1: "stuff", 2: "part", 3: "multi", 4: "single"}
    for ref in refer.data["refs"]:
        row = rows[(ref["shard"], ref["index"])]
        o = row["objects"][ref["object"]]
        assert [s["raw"] for s in ref["sentences"]] == [o["expression"]] and o["kept"]
        assert ref["sentences"][0]["tokens"] == ref["sentences"][0]["sent"].split()
        got = refer.getMask(ref)
        assert np.array_equal(got["mask"].astype(bool), object_masks(row)[ref["object"]]) and got["area"] == o["area"]
        image = refer.Imgs[ref["image_id"]]
        assert (image["shard"], image["index"], image["split"]) == (ref["shard"], ref["index"], ref["split"])
        assert image["file_name"] == f"{ref['shard']}/{row['image_key']}.jpg"
        assert refer.Cats[ref["category_id"]] == o["category"]
        ann = refer.refToAnn[ref["ref_id"]]
        x0, y0, x1, y1 = o["box"]
        assert ann["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
    assert refer.Refs[3]["sentences"][0]["raw"] == "both plates" and refer.refToAnn[3]["members"] == [1, 2]


def test_refcoco_splits_partition_the_images_and_stay_put_for_a_seed(tmp_path):
    out = write_output(str(tmp_path / "out"), ("sa_000000", "sa_000001", "sa_000002"), lambda u: many_rows(u, 20))
    splits = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        dest = str(tmp_path / run / "refcoco")
        counts = export.export(out, dest, "refcoco", seed=seed)
        refer = Refer(str(tmp_path / run), "refcoco", "sculpt")
        by_split = {s: set(refer.getImgIds(refer.getRefIds(split=s))) for s in ("train", "val", "test")}
        images = [by_split[s] for s in ("train", "val", "test")]
        assert sum(map(len, images)) == len(set().union(*images)) == len(refer.Imgs) == 60  # each in one split
        assert [counts[s] for s in ("train", "val", "test")] == [len(i) for i in images]
        assert all(images)  # 60 images at 0.8/0.1/0.1: every split has some
        splits[run] = {(refer.Imgs[i]["shard"], refer.Imgs[i]["index"]): s for s, ids in by_split.items() for i in ids}
    assert splits["a"] == splits["b"] and splits["a"] != splits["c"]
    # an image's split is its own: exporting part of the output leaves the others where they were
    os.remove(f"{out}/.sculpt/markers/sa_000002.json")
    export.export(out, str(tmp_path / "part" / "refcoco"), "refcoco")
    refer = Refer(str(tmp_path / "part"), "refcoco", "sculpt")
    part = {(r["shard"], r["index"]): r["split"] for r in refer.data["refs"]}
    assert len(part) == 40 and all(splits["a"][key] == s for key, s in part.items())
    assert sum(1 for s in splits["a"].values() if s == "train") > 40
    export.export(out, str(tmp_path / "all_train"), "refcoco", split="1,0,0")
    assert {r["split"] for r in Refer(str(tmp_path), "all_train", "sculpt").data["refs"]} == {"train"}
    with pytest.raises(export.ExportError, match="three fractions"):
        export.export(out, str(tmp_path / "bad"), "refcoco", split="0.5,0.5")


def test_refs_pickle_streams_in_batches_that_unpickle_as_one_list(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "REFS_PER_BATCH", 7)
    out = write_output(str(tmp_path / "out"), ("sa_000000",), lambda u: many_rows(u, 20))
    export.export(out, str(tmp_path / "refcoco"), "refcoco")
    with open(tmp_path / "refcoco" / "refs(sculpt).p", "rb") as f:
        data = f.read()
    pickletools.dis(data, out=io.StringIO())  # a well-formed stream: one list, appended in batches, no memo clash
    refs = pickle.loads(data)
    assert [r["ref_id"] for r in refs] == list(range(1, 21))
    assert refs[4]["sentences"][0]["raw"] == "the thing number 4" and refs[4]["index"] == 4


# --- LISA's VQADataset (LLaVA conversations) --------------------------------------------------------------------------

def lisa_conversations(path, image_root=""):
    """LISA's vqa_dataset.py: preprocess_multimodal, the roles, the alternation check; then each [SEG] its mask."""
    with open(path) as f:
        data = json.load(f)
    loaded = []
    for item in data:
        image_path = os.path.join(image_root, item["image"])
        source = item["conversations"]
        for sentence in source:
            if "<image>" in sentence["value"]:
                sentence["value"] = "<image>\n" + sentence["value"].replace("<image>", "").strip()
                sentence["value"] = sentence["value"].strip()
        roles = {"human": "USER", "gpt": "ASSISTANT"}
        if roles[source[0]["from"]] != "USER":
            source = source[1:]
        messages = []
        for j, sentence in enumerate(source):
            role = roles[sentence["from"]]
            assert role == ("USER", "ASSISTANT")[j % 2]
            messages.append((role, sentence["value"]))
        segs = sum(value.count("[SEG]") for role, value in messages if role == "ASSISTANT")
        assert segs == len(item["masks"])
        masks = [coco_mask.decode({"size": m["size"], "counts": m["counts"].encode()}).astype(bool)
                 for m in item["masks"]]
        loaded.append({"image_path": image_path, "messages": messages, "masks": masks, "item": item})
    return loaded


def test_llava_conversations_load_in_lisas_reader_with_a_mask_per_seg(out, tmp_path):
    dest = str(tmp_path / "llava.json")
    assert cli.main(["export", out, dest, "--format", "llava"]) == 0
    loaded = lisa_conversations(dest)
    rows = output_rows(out)
    assert [c["item"]["id"] for c in loaded][:4] == ["sa_000000:0:refer", "sa_000000:0:caption", "sa_000000:3:refer",
                                                     "sa_000000:3:caption"]
    assert len(loaded) == 8
    for c in loaded:
        item = c["item"]
        row = rows[(item["shard"], item["index"])]
        masks = object_masks(row)
        assert c["image_path"] == f"{item['shard']}/{row['image_key']}.jpg"
        assert c["messages"][0][1].startswith("<image>\n")
        assert all("<image>" not in value for _, value in c["messages"][1:])
        assert len(item["turns"]) * 2 == len(c["messages"])
        for n, turn in enumerate(item["turns"]):
            question, answer = c["messages"][2 * n][1], c["messages"][2 * n + 1][1]
            assert answer.count("[SEG]") == len(turn["masks"])
            if turn["kind"] == "caption":
                spans = turn["spans"]
                for k, objects in zip(turn["masks"], turn["objects"]):
                    assert np.array_equal(c["masks"][k], np.logical_or.reduce([masks[i] for i in objects]))
                assert answer.count("<p>") == len(spans)
                continue
            (position,) = turn["objects"]
            o = row["objects"][position]
            assert o["kept"] and turn["expression"] == o["expression"] and o["expression"] in question
            if turn["kind"] == "negative":
                assert o["category"] == "negative" and answer == "It is not in this image." and not turn["masks"]
            else:
                assert turn["kind"] == "refer" and answer == "Sure, it is [SEG]."
                assert np.array_equal(c["masks"][turn["masks"][0]], masks[position])
    refer_a = loaded[0]["item"]
    assert [t["objects"] for t in refer_a["turns"]] == [[0], [1], [3], [4], [5]]
    assert refer_a["conversations"][0]["value"] == "<image>\nPlease segment the red cup on the left."
    assert [t["kind"] for t in loaded[2]["item"]["turns"]] == ["refer", "negative"]  # the unkept negative left out
    caption_a = loaded[1]["item"]
    assert caption_a["conversations"][1]["value"] == (
        "A <p> red cup </p> [SEG] and <p> two plates </p> [SEG] near a <p> red cup </p> [SEG] on a table.")


def test_training_exports_extract_images_that_glamm_opens(tmp_path):
    from tests.test_export import gradient, shard_output

    def objects(h, w):
        return [thing((0, 0, w // 2, h // 2), "the top left", phrase="picture", caption="a picture", size=(h, w))]

    out = shard_output(tmp_path, [samples.jpeg_bytes(gradient(20, 24)), samples.jpeg_bytes(gradient(18, 30))],
                       objects=objects)
    dest, folder = str(tmp_path / "gcg.json"), str(tmp_path / "images")
    assert cli.main(["export", out, dest, "--format", "gcg", "--images", folder]) == 0
    loaded = glamm_gcg(dest, image_folder="/elsewhere", open_images=True)  # an absolute file_name wins the join
    assert [a["masks"][0].shape for a in loaded] == [(20, 24), (18, 30)]
    assert [a["tagged"] for a in loaded] == ["a <p> picture </p> [SEG]"] * 2
    assert sorted(os.listdir(tmp_path / "images" / "sa_000000")) == ["sa_1.jpg", "sa_2.jpg"]


def test_training_exports_to_s3(s3_server, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="training")
    s3 = storage.S3Options(endpoint=s3_server)
    write_output("s3://training/out", ("sa_000000",), s3=s3)
    assert cli.main(["export", "s3://training/out", "s3://training/refcoco", "--format", "refcoco",
                     "--s3-endpoint", s3_server]) == 0
    assert storage.list_names("s3://training/refcoco", s3) == ["instances.json", "refs(sculpt).p"]
    refs = pickle.loads(storage.read_bytes("s3://training/refcoco/refs(sculpt).p", s3))
    assert len(refs) == 5 and refs[0]["sentences"][0]["raw"] == "the red cup on the left"
    for fmt in ("gcg", "llava"):
        counts = export.export("s3://training/out", f"s3://training/{fmt}.json", fmt, s3)
        records = json.loads(storage.read_bytes(f"s3://training/{fmt}.json", s3))
        assert len(records) == counts["records"] == (2 if fmt == "gcg" else 4)
    with pytest.raises(export.ExportError, match="exists"):
        export.export("s3://training/out", "s3://training/gcg.json", "gcg", s3)


# --- issue 30's other kinds: reasoning references and grounded chat, and outputs from before them ---------------------

CHAT_TURNS = [  # about image_objects(): the left cup (0), the group of plates (3), the rejected table (7)
    {"question": "What can one drink from here?", "answer": "The cup on the left, or the plates' owner's cup.",
     "spans": [{"start": 0, "end": 19, "objects": [0]}]},
    {"question": "What holds the food?", "answer": "Both plates do, on the table.",
     "spans": [{"start": 0, "end": 11, "objects": [3]}, {"start": 19, "end": 28, "objects": [7]}]},
    {"question": "Is the table set?", "answer": "Yes, the table is.",  # names only a rejected object: no export
     "spans": [{"start": 5, "end": 14, "objects": [7]}]},
]


def reasoning_rows(unit):
    from sculpt.annotation import reasoning

    rows = unit_rows(unit)
    objects = rows[0]["objects"]
    objects.append({**schema.new_object(**reasoning.reasoning_fields(objects, 0, "what people drink hot coffee from")),
                    "kept": True, "iou": 0.8})
    objects.append({**schema.new_object(**reasoning.reasoning_fields(objects, 4, "what holds a second drink")),
                    "kept": False, "iou": 0.1, "reject_reason": "low_iou"})
    rows[0]["chat"] = CHAT_TURNS
    return rows


def test_reasoning_pairs_and_chat_turns_export_to_llava_gcg_and_refcoco(tmp_path):
    out = write_output(str(tmp_path / "out"), ("sa_000000",), make_rows=reasoning_rows)
    rows = output_rows_of(out, ("sa_000000",))
    row = rows[("sa_000000", 0)]
    masks = object_masks(row)
    assert row["chat"][1]["spans"][1] == {"start": 19, "end": 28, "objects": [7]}  # stored as written
    # llava: the kept reasoning pair joins the refer conversation with its own question; the chat turns follow the
    # caption, each phrase a [SEG] with its object's mask (a turn naming only rejected objects is left out)
    dest = str(tmp_path / "llava.json")
    assert cli.main(["export", out, dest, "--format", "llava"]) == 0
    loaded = {c["item"]["id"]: c for c in lisa_conversations(dest)}
    refer = loaded["sa_000000:0:refer"]
    [(n, turn)] = [(n, t) for n, t in enumerate(refer["item"]["turns"]) if t["kind"] == "reasoning"]
    assert turn["objects"] == [8] and turn["expression"] == "what people drink hot coffee from"
    assert refer["messages"][2 * n][1] == "what people drink hot coffee from Please output the segmentation mask."
    assert refer["messages"][2 * n + 1][1] == "Sure, it is [SEG]."
    assert np.array_equal(refer["masks"][turn["masks"][0]], masks[0])
    caption = loaded["sa_000000:0:caption"]
    assert [t["kind"] for t in caption["item"]["turns"]] == ["caption", "chat", "chat"]
    assert caption["messages"][2:] == [
        ("USER", "What can one drink from here?"),
        ("ASSISTANT", "<p> The cup on the left </p> [SEG], or the plates' owner's cup."),
        ("USER", "What holds the food?"), ("ASSISTANT", "<p> Both plates </p> [SEG] do, on the table.")]
    for turn in caption["item"]["turns"][1:]:
        for k, objects in zip(turn["masks"], turn["objects"]):
            assert np.array_equal(caption["masks"][k], np.logical_or.reduce([masks[i] for i in objects]))
    assert caption["item"]["turns"][2]["objects"] == [[3]]
    # gcg: one record per chat turn after the caption's, its question beside the answer, which GLaMM's reader tags
    dest = str(tmp_path / "gcg.json")
    assert cli.main(["export", out, dest, "--format", "gcg"]) == 0
    gcg = [a for a in glamm_gcg(dest) if a["info"]["index"] == 0]
    assert [a["info"]["kind"] for a in gcg] == ["caption", "chat", "chat"]
    assert [a["info"].get("question") for a in gcg] == [None, "What can one drink from here?", "What holds the food?"]
    assert gcg[2]["tagged"] == "<p> Both plates </p> [SEG] do, on the table."
    assert np.array_equal(gcg[1]["masks"][0].astype(bool), masks[0])
    # refcoco: the kept reasoning pair is a ref of its own on its target's mask, its annotation says its style
    data = tmp_path / "data"
    assert cli.main(["export", out, str(data / "refcoco"), "--format", "refcoco"]) == 0
    api = Refer(str(data), "refcoco", "sculpt")
    [ref] = [r for r in api.data["refs"] if r["index"] == 0 and r["object"] == 8]
    assert ref["sentences"][0]["raw"] == "what people drink hot coffee from"
    assert api.refToAnn[ref["ref_id"]]["style"] == "reasoning" and api.refToAnn[ref["ref_id"]]["target"] == 0
    assert np.array_equal(api.getMask(ref)["mask"].astype(bool), masks[0])
    assert not [r for r in api.data["refs"] if r["index"] == 0 and r["object"] == 9]  # the rejected one


def output_rows_of(out, units):
    import pyarrow.parquet as pq

    return {(r["shard"], r["index"]): r for name in units for r in pq.read_table(f"{out}/{name}.parquet").to_pylist()}


def test_outputs_of_schema_version_4_still_export(tmp_path):
    """An output written before reasoning and chat (objects without style and target, no chat column) exports the
    same in every training format: readers take the missing fields as null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    new = write_output(str(tmp_path / "new"), ("sa_000000",))
    old = write_output(str(tmp_path / "old"), ("sa_000000",))
    path = f"{old}/sa_000000.parquet"
    table = pq.read_table(path)
    old_object = pa.struct([f for f in schema.OBJECT_TYPE if f.name not in ("style", "target")])
    old_schema = pa.schema([f.with_type(pa.list_(old_object)) if f.name == "objects" else f
                            for f in schema.OUTPUT_SCHEMA if f.name != "chat"])
    rows = [{k: v for k, v in r.items() if k != "chat"} for r in table.to_pylist()]
    for r in rows:
        r["objects"] = [{k: v for k, v in o.items() if k not in ("style", "target")} for o in r["objects"] or []] \
            if r["objects"] is not None else None
    pq.write_table(pa.Table.from_pylist(rows, schema=old_schema), path)
    assert "chat" not in pq.read_schema(path).names
    for fmt, name in (("gcg", "x.json"), ("llava", "x.json"), ("refcoco", "refcoco")):
        assert cli.main(["export", old, str(tmp_path / "o" / fmt / name), "--format", fmt]) == 0
        assert cli.main(["export", new, str(tmp_path / "n" / fmt / name), "--format", fmt]) == 0
    for fmt in ("gcg", "llava"):
        assert json.loads((tmp_path / "o" / fmt / "x.json").read_text()) == \
            json.loads((tmp_path / "n" / fmt / "x.json").read_text())
    old_api, new_api = (Refer(str(tmp_path / side / "refcoco"), "refcoco", "sculpt") for side in ("o", "n"))
    assert len(old_api.Refs) == 5 and old_api.data["refs"] == new_api.data["refs"]
    assert old_api.data["annotations"] == new_api.data["annotations"]
