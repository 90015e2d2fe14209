"""sculpt export round trips: each format loaded by its own library gives back the Parquet rows' pairs."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from sculpt import cli, schema
from sculpt.outputs import export, pairs
from sculpt.annotation import images, rle
from sculpt.testing import samples
from sculpt.io import storage
from sculpt.outputs.store import OutputStore
from sculpt.outputs.units import UnitWriter
from tests.helpers import encoded, exif_rotated_jpeg

JOB = {"fingerprint": "f", "settings": {}, "model_ids": {}, "prompts_version": "p1", "total_shards": 2}
H, W = 12, 16


def mask_at(x0, y0, x1, y1, size=(H, W)):
    m = np.zeros(size, bool)
    m[y0:y1, x0:x1] = True
    return m


def obj(box, iou=None, expression=None, error=None, phrase="thing", size=(H, W)):
    x0, y0, x1, y1 = box
    m = mask_at(*box, size=size)
    return {"phrase": phrase, "box": [float(x0), float(y0), float(x1 - 1), float(y1 - 1)], "mask": rle.encode(m),
            "area": int(m.sum()), "iou": iou, "kept": None if iou is None else iou >= 0.5, "expression": expression,
            "expression_words": len(expression.split()) if expression else None, "error": error,
            "reject_reason": None if iou is None or iou >= 0.5 else "low_iou", "instances": 2,
            "listener_iou": None if iou is None else round(iou / 2, 2)}


def unit_rows(unit):
    a = schema.new_row(unit, 0, f"{unit}_a", image_id=1, width=W, height=H, caption="A red cup and a blue plate.",
                       objects=[obj((1, 1, 5, 6), 0.9, "the red cup", phrase="red cup"),
                                obj((6, 2, 15, 11), 0.3, "a plate on the right", phrase="blue plate"),
                                obj((0, 0, 3, 3), 0.7, "the cup's handle, left")])
    b = schema.new_row(unit, 1, f"{unit}_b", width=W, height=H, caption="x",
                       objects=[obj((2, 2, 4, 4), error="refer: unusable referring expression 'zz'")])
    c = schema.mark_error(schema.new_row(unit, 2, f"{unit}_c"), "read", "cut off")
    d = schema.new_row(unit, 3, f"{unit}_d", width=W, height=H, status=schema.EMPTY)
    e = schema.new_row(unit, 4, f"{unit}_e", width=W, height=H, caption="only rejected",
                       objects=[obj((3, 3, 9, 9), 0.1, "a shadow")])
    rows = [a, b, c, d, e]
    for row in rows:
        row["unit_end"] = {"size": len(rows), "bytes_read": 10}
    return rows


@pytest.fixture
def out(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    store.prepare(JOB)
    for unit in ("sa_000000", "sa_000001"):
        writer = UnitWriter(store, unit, JOB, flush_rows=2)
        writer.add(schema.to_table(unit_rows(unit)))
        writer.commit()
    return str(tmp_path / "out")


def parquet_pairs(out, keep_all):
    """(shard, index, object) -> object, straight from the Parquet files."""
    table = pq.read_table(f"{out}/sa_000000.parquet").to_pylist() + pq.read_table(f"{out}/sa_000001.parquet").to_pylist()
    return {(r["shard"], r["index"], j): o for r in table if r["status"] == "ok" for j, o in enumerate(r["objects"])
            if not o["error"] and (keep_all or o["kept"])}


# --- a GSEval reader that reads as GroundingSuite's evaluate_grounding.py does (mask mode) ---------------------------

def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def gseval_giou(gt_file, pred_file):
    """Mean per-sample mask IoU: predictions matched on `idx` (else `image_path`), RLE decoded by pycocotools,
    `segmentation` (or `predicted_segmentation`) of each; samples without masks are skipped."""
    from pycocotools import mask as mask_utils

    gt, pred = read_jsonl(gt_file), read_jsonl(pred_file)
    pred_map = {p["idx"]: p for p in pred if p.get("idx") is not None} or {p["image_path"]: p for p in pred if p.get("image_path")}
    ious, per_class = [], {}
    for item in gt:
        match = pred_map.get(item.get("idx")) if item.get("idx") is not None else None
        match = match or pred_map.get(item["image_path"])
        gt_seg = item.get("segmentation")
        pred_seg = match and (match.get("segmentation") or match.get("predicted_segmentation"))
        if not gt_seg or not pred_seg:
            continue
        a, b = mask_utils.decode(gt_seg), mask_utils.decode(pred_seg)
        union = np.logical_or(a, b).sum()
        iou = np.logical_and(a, b).sum() / union if union > 0 else 0.0
        ious.append(iou)
        per_class.setdefault(item.get("class_id", 0), []).append(iou)
    return sum(ious) / len(ious) if ious else 0.0, len(ious), per_class


def test_gseval_scores_itself_at_giou_one_and_traces_every_line(out, tmp_path):
    dest = str(tmp_path / "gseval.jsonl")
    assert cli.main(["export", out, dest, "--format", "gseval"]) == 0
    lines = read_jsonl(dest)
    expected = parquet_pairs(out, keep_all=False)
    assert len(lines) == len(expected) == 4  # 2 kept pairs per shard
    giou, scored, per_class = gseval_giou(dest, dest)
    assert scored == 4 and giou == pytest.approx(1.0) and set(per_class) == {4}
    assert [line["idx"] for line in lines] == [0, 1, 2, 3]
    for line in lines:
        o = expected[(line["shard"], line["index"], line["object"])]
        assert line["label"] == o["expression"] and line["box"] == pytest.approx(o["box"])
        assert line["image_path"] == f"{line['shard']}/{line['shard']}_a.jpg" and line["caption"] == "A red cup and a blue plate."
        assert isinstance(line["segmentation"]["counts"], str) and line["segmentation"]["size"] == [H, W]
        assert np.array_equal(rle.decode(line["segmentation"]), rle.decode(o["mask"]))
        assert line["class_id"] == 4 and line["kept"] is True


def test_all_exports_rejected_pairs_with_iou_and_kept(out, tmp_path):
    dest = str(tmp_path / "all.jsonl")
    assert cli.main(["export", out, dest, "--format", "gseval", "--all"]) == 0
    lines = read_jsonl(dest)
    expected = parquet_pairs(out, keep_all=True)
    assert len(lines) == len(expected) == 8  # 3 of image a + 1 of image e, per shard; b's errored object, c, d: none
    keys = {(line["shard"], line["index"], line["object"]) for line in lines}
    assert keys == set(expected) and {k[1] for k in keys} == {0, 4}
    for line in lines:
        o = expected[(line["shard"], line["index"], line["object"])]
        assert line["iou"] == pytest.approx(o["iou"]) and line["kept"] is (o["iou"] >= 0.5)
    assert sum(not line["kept"] for line in lines) == 4


def test_coco_loads_in_pycocotools_with_the_same_masks_boxes_and_expressions(out, tmp_path):
    from pycocotools.coco import COCO

    dest = str(tmp_path / "coco" / "instances.json")
    assert cli.main(["export", out, dest, "--format", "coco", "--all"]) == 0
    coco = COCO(dest)
    expected = parquet_pairs(out, keep_all=True)
    assert len(coco.getAnnIds()) == len(expected) == 8 and len(coco.getImgIds()) == 4  # images a and e of each shard
    assert coco.loadCats(coco.getCatIds()) == [{"id": 1, "name": "object", "supercategory": "object"}]
    refs = {r["ann_id"]: r for r in coco.dataset["refs"]}
    assert len(refs) == 8
    for ann in coco.loadAnns(coco.getAnnIds()):
        o = expected[(ann["shard"], ann["index"], ann["object"])]
        image = coco.loadImgs(ann["image_id"])[0]
        assert (image["height"], image["width"]) == (H, W) and image["file_name"].startswith(ann["shard"] + "/")
        assert np.array_equal(coco.annToMask(ann).astype(bool), rle.decode(o["mask"]))
        x0, y0, x1, y1 = o["box"]
        assert ann["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0]) and ann["area"] == o["area"]
        ref = refs[ann["id"]]
        assert ref["image_id"] == ann["image_id"] and [s["raw"] for s in ref["sentences"]] == [o["expression"]]
        assert ref["sentences"][0]["tokens"] == ref["sentences"][0]["sent"].split()
    assert refs[3]["sentences"][0]["tokens"] == ["the", "cup's", "handle", "left"]
    assert not (tmp_path / "coco" / "_tmp").exists()


def test_hf_pairs_load_in_datasets_with_the_same_masks_and_expressions(out, tmp_path):
    import datasets

    dest = str(tmp_path / "hf")
    assert cli.main(["export", out, dest, "--format", "hf"]) == 0
    ds = datasets.load_dataset("parquet", data_files=f"{dest}/*.parquet", split="train")
    expected = parquet_pairs(out, keep_all=False)
    assert ds.num_rows == len(expected) == 4
    for row in ds:
        o = expected[(row["shard"], row["index"], row["object"])]
        assert row["expression"] == o["expression"] and row["box"] == pytest.approx(o["box"])
        assert np.array_equal(rle.decode(row["mask"]), rle.decode(o["mask"]))
        assert row["image_path"] == f"{row['shard']}/{row['image_key']}.jpg" and row["kept"] is True


def test_hf_splits_files_and_all_keeps_rejected(out, tmp_path):
    dest = str(tmp_path / "hf")
    counts = export.write_hf(pairs.iter_pairs(out, keep_all=True), dest, rows_per_file=3)
    assert counts == {"images": 4, "pairs": 8, "files": 3}
    table = pq.ParquetDataset(dest).read()
    assert table.num_rows == 8 and table.schema.equals(export.PAIR_SCHEMA)
    assert sorted(table["kept"].to_pylist()) == [False] * 4 + [True] * 4
    # every score of the keep rule comes along: the reason a pair was rejected, its instances, the listener's IoU
    rows = table.to_pylist()
    assert {(r["kept"], r["reject_reason"]) for r in rows} == {(True, None), (False, "low_iou")}
    assert {r["instances"] for r in rows} == {2}
    assert all(r["listener_iou"] == pytest.approx(round(r["iou"] / 2, 2)) for r in rows)


def test_refuses_existing_dest_and_empty_output(out, tmp_path, capsys):
    dest = tmp_path / "x.jsonl"
    dest.write_text("keep me")
    assert cli.main(["export", out, str(dest), "--format", "gseval"]) == 1
    assert "exists" in capsys.readouterr().err and dest.read_text() == "keep me"
    assert cli.main(["export", out, str(dest), "--format", "gseval", "--overwrite"]) == 0
    assert len(read_jsonl(dest)) == 4
    assert cli.main(["export", str(tmp_path / "nothing"), str(tmp_path / "y.jsonl"), "--format", "coco"]) == 1
    assert "no sculpt output" in capsys.readouterr().err


def test_uncommitted_units_and_bookkeeping_are_not_exported(out, tmp_path):
    import os

    os.remove(f"{out}/.sculpt/markers/sa_000001.json")  # as if killed between the Parquet file and its marker
    assert [p.rsplit("/", 1)[1] for p in pairs.data_files(out)] == ["sa_000000.parquet"]
    counts = export.export(out, str(tmp_path / "g.jsonl"), "gseval", keep_all=True)
    assert counts == {"images": 2, "pairs": 4}
    os.remove(f"{out}/.sculpt/markers/sa_000000.json")  # no unit committed yet: nothing to export, though Parquet is there
    assert pairs.data_files(out) == [] and os.path.exists(f"{out}/sa_000000.parquet")


def test_rows_stream_in_batches_in_index_order(tmp_path, monkeypatch):
    store = OutputStore(str(tmp_path / "out"))
    store.prepare(JOB)
    writer = UnitWriter(store, "sa_000000", JOB, flush_rows=2)
    rows = unit_rows("sa_000000")
    for row in (rows[3], rows[0], rows[4], rows[2], rows[1]):  # batches finish out of order
        writer.add(schema.to_table([row]))
    writer.commit()
    taken = []
    real = pairs.pads.dataset

    def spy(*args, **kwargs):
        dataset = real(*args, **kwargs)

        class Spy:
            def to_table(self, **kw):
                return dataset.to_table(**kw)

            def take(self, indices, **kw):
                taken.append(len(indices))
                return dataset.take(indices, **kw)
        return Spy()

    monkeypatch.setattr(pairs.pads, "dataset", spy)
    assert [row["index"] for row in pairs.iter_rows(str(tmp_path / "out"), batch_size=2)] == [0, 1, 2, 3, 4]
    assert taken == [2, 2, 1]


def test_s3_output_exports_to_s3(s3_server, tmp_path):
    import boto3

    from sculpt.io.storage import S3Options

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="export")
    s3 = S3Options(endpoint=s3_server)
    store = OutputStore("s3://export/out", s3)
    store.prepare(JOB)
    writer = UnitWriter(store, "sa_000000", JOB)
    writer.add(schema.to_table(unit_rows("sa_000000")))
    writer.commit()
    assert cli.main(["export", "s3://export/out", "s3://export/gseval.jsonl", "--format", "gseval", "--all",
                     "--s3-endpoint", s3_server]) == 0
    lines = [json.loads(line) for line in storage.read_bytes("s3://export/gseval.jsonl", s3).decode().splitlines()]
    assert len(lines) == 4 and {line["index"] for line in lines} == {0, 4}
    assert export.export("s3://export/out", "s3://export/hf", "hf", s3) == {"images": 1, "pairs": 2, "files": 1}
    assert storage.list_names("s3://export/hf", s3) == ["pairs-00000.parquet"]


def test_labelstudio_brush_masks_decode_to_the_parquet_masks(out, tmp_path):
    from label_studio_sdk.converter import brush
    from pycocotools import mask as mask_utils

    dest = str(tmp_path / "ls" / "tasks.json")
    assert cli.main(["export", out, dest, "--format", "labelstudio", "--all"]) == 0
    with open(dest, encoding="utf-8") as f:
        tasks = json.load(f)
    expected = parquet_pairs(out, keep_all=True)
    results = [r for t in tasks for p in t["predictions"] for r in p["result"]]
    by_type = {kind: [r for r in results if r["type"] == kind] for kind in ("brushlabels", "textarea", "rectanglelabels")}
    assert len(tasks) == 4 and all(len(v) == len(expected) == 8 for v in by_type.values())
    for task in tasks:
        assert task["data"]["image"] == f"{task['data']['shard']}/{task['data']['image_key']}.jpg"
    texts = {r["id"]: r["value"]["text"] for r in by_type["textarea"]}
    for r in by_type["brushlabels"]:
        o = expected[(r["meta"]["shard"], r["meta"]["index"], r["meta"]["object"])]
        h, w = r["original_height"], r["original_width"]
        decoded = brush.decode_rle(r["value"]["rle"]).reshape(h, w, 4)[:, :, 3] > 0
        assert decoded.any() and np.array_equal(decoded, mask_utils.decode(o["mask"]).astype(bool))
        assert r["value"]["format"] == "rle" and r["value"]["brushlabels"] == ["object"]
        assert texts[r["id"]] == [o["expression"]] and r["meta"]["iou"] == pytest.approx(o["iou"])
    for r in by_type["rectanglelabels"]:
        o = expected[(r["meta"]["shard"], r["meta"]["index"], r["meta"]["object"])]
        v, w, h = r["value"], r["original_width"], r["original_height"]
        x0, y0, x1, y1 = o["box"]
        assert [v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100, (v["y"] + v["height"]) * h / 100] \
            == pytest.approx([x0, y0, x1, y1])
    assert not (tmp_path / "ls" / "_tmp").exists()


def gradient(height, width):
    """An image whose every pixel differs from its neighbours, so that a turned copy is told apart."""
    ys, xs = np.mgrid[:height, :width]
    return np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) * 127 // (width + height)], -1).astype(np.uint8)


def shard_output(root, pictures: list[bytes], objects=None, out=None, s3=storage.S3Options()) -> str:
    """An output of one committed unit sa_000000 whose rows are the pictures of the input shard root/shards/sa_000000.tar;
    ``objects(height, width)`` gives each row's objects (default: one kept object, its top-left quarter)."""
    objects = objects or (lambda h, w: [obj((0, 0, w // 2, h // 2), 0.9, "the top left", size=(h, w))])
    shard_dir = root / "shards"
    shard_dir.mkdir()
    members, rows = [], []
    for i, data in enumerate(pictures):
        upright = images.load_rgb(data)
        h, w = upright.shape[:2]
        members += [(f"./sa_{i + 1}.jpg", data), (f"./sa_{i + 1}.json", samples.sa1b_json(i + 1, upright))]
        rows.append(schema.new_row("sa_000000", i, f"sa_{i + 1}", image_id=i + 1, width=w, height=h, caption="a picture",
                                   objects=objects(h, w), unit_end={"size": len(pictures), "bytes_read": 1}))
    samples.write_tar(str(shard_dir / "sa_000000.tar"), members)
    job = {**JOB, "inputs": [str(shard_dir)], "total_shards": 1}
    store = OutputStore(out or str(root / "out"), s3)
    store.prepare(job)
    writer = UnitWriter(store, "sa_000000", job)
    writer.add(schema.to_table(rows))
    writer.commit()
    return out or str(root / "out")


def test_images_are_extracted_once_upright_and_records_point_at_them(tmp_path):
    from PIL import Image

    picture = gradient(30, 40)
    plain, turned, png = samples.jpeg_bytes(picture), exif_rotated_jpeg(picture, 6), encoded(picture, "PNG")
    out = shard_output(tmp_path, [plain, turned, png])
    dest, folder = str(tmp_path / "g.jsonl"), str(tmp_path / "images")
    assert cli.main(["export", out, dest, "--format", "gseval", "--images", folder]) == 0
    lines = read_jsonl(dest)
    assert [line["image_path"] for line in lines] == [f"{folder}/sa_000000/sa_{i}.jpg" for i in (1, 2, 3)]
    assert sorted(p.name for p in (tmp_path / "images" / "sa_000000").iterdir()) == ["sa_1.jpg", "sa_2.jpg", "sa_3.jpg"]
    assert (tmp_path / "images" / "sa_000000" / "sa_1.jpg").read_bytes() == plain  # already upright: its own bytes
    for line, original in zip(lines, (plain, turned, png)):
        with open(line["image_path"], "rb") as f:
            written = f.read()
        with Image.open(line["image_path"]) as image:
            assert image.format == "JPEG" and image.getexif().get(0x0112, 1) == 1
        upright = images.load_rgb(original)
        assert images.load_rgb(written).shape == upright.shape == (rle.decode(line["segmentation"]).shape + (3,))
        assert np.abs(images.load_rgb(written).astype(int) - upright).mean() < 4
    assert images.load_rgb(turned).shape[:2] == (40, 30)  # the turned one really was turned


def test_images_in_a_relative_folder_are_found_by_the_evaluator_given_that_folder(tmp_path, monkeypatch):
    out = shard_output(tmp_path, [samples.jpeg_bytes(gradient(20, 24))] * 2)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", out, "g.jsonl", "--format", "gseval", "--images", "images"]) == 0
    paths = [line["image_path"] for line in read_jsonl(str(tmp_path / "g.jsonl"))]
    assert paths == [str(tmp_path / "images" / "sa_000000" / f"sa_{i}.jpg") for i in (1, 2)]
    assert all(os.path.isfile(os.path.join("images", path)) for path in paths)  # evaluate_grounding.py's join


def test_a_job_given_a_relative_input_has_its_shards_found_from_any_directory(sample_shards, tmp_path, monkeypatch):
    from sculpt import config
    from sculpt.engine import planning
    from sculpt.engine.job import take_output
    from sculpt.io import shards

    monkeypatch.chdir(os.path.dirname(sample_shards[0]))
    name = os.path.basename(sample_shards[0])
    cfg = config.load(None, [f"input.shards={json.dumps([name])}", f"output.path={tmp_path / 'out'}",
                             'stages=[{"name": "faulty", "class": "tests.doubles:Faulty"}]'])
    stages = config.build_stages(cfg)
    with take_output(cfg, stages, planning.plan(cfg, stages)):  # writes the job file, which records the inputs
        pass
    monkeypatch.chdir(tmp_path)  # export and preview run from elsewhere
    found = pairs.ShardImages(str(tmp_path / "out")).get({"shard": name[: -len(".tar")], "index": 0})
    first = next(shards.read_shard(sample_shards[0]))[0]
    assert first["index"] == 0 and found == first["image_bytes"] and found


def test_images_from_moved_shards_and_under_another_root(tmp_path, capsys):
    out = shard_output(tmp_path, [samples.jpeg_bytes(gradient(20, 24))] * 2)
    (tmp_path / "shards").rename(tmp_path / "moved")
    dest, folder = str(tmp_path / "tasks.json"), str(tmp_path / "images")
    assert cli.main(["export", out, dest, "--format", "labelstudio", "--images", folder]) == 1
    assert "--shards" in capsys.readouterr().err
    assert cli.main(["export", out, dest, "--format", "labelstudio", "--images", folder, "--shards", str(tmp_path / "moved"),
                     "--image-root", "/data/local-files/?d=images"]) == 0
    with open(dest, encoding="utf-8") as f:
        tasks = json.load(f)
    assert [t["data"]["image"] for t in tasks] == [f"/data/local-files/?d=images/sa_000000/sa_{i}.jpg" for i in (1, 2)]
    assert len(list((tmp_path / "images" / "sa_000000").iterdir())) == 2


def test_categories_become_gseval_class_ids_and_negatives_go_only_to_hf(tmp_path):
    import datasets

    store = OutputStore(str(tmp_path / "out"))
    store.prepare(JOB)
    objects = [obj((1, 1, 5, 6), 0.9, "the sky at the top", phrase="sky"), obj((6, 2, 15, 11), 0.9, "the cup's handle"),
               obj((0, 0, 3, 3), 0.9, "the left cup"), obj((4, 0, 8, 3), 0.9, "the right cup"),
               obj((0, 0, 8, 3), 0.9, "both cups"),
               {**schema.new_object(expression="a yellow umbrella by the door", category="negative", area=0, kept=True),
                "mask": rle.empty(H, W)}]
    for o, category in zip(objects, ["stuff", "part", "single", "single", "multi"]):
        o["category"] = category
    objects[4]["members"] = [2, 3]
    row = schema.new_row("sa_000000", 0, "sa_1", width=W, height=H, caption="c", objects=objects, unit_end={"size": 1, "bytes_read": 1})
    writer = UnitWriter(store, "sa_000000", JOB)
    writer.add(schema.to_table([row]))
    writer.commit()
    out = str(tmp_path / "out")

    export.export(out, str(tmp_path / "gs.jsonl"), "gseval")
    records = read_jsonl(tmp_path / "gs.jsonl")
    assert [r["class_id"] for r in records] == [1, 2, 4, 4, 3]  # stuff, part, single, single, multi; no negative
    export.export(out, str(tmp_path / "hf"), "hf")
    loaded = datasets.load_dataset("parquet", data_files=f"{tmp_path / 'hf'}/*.parquet", split="train")
    assert loaded["category"] == ["stuff", "part", "single", "single", "multi", "negative"]
    assert loaded["members"][4] == [2, 3] and loaded["box"][5] is None
    assert not rle.decode(loaded["mask"][5]).any()  # a negative's target: nothing


# --- the expression's style (issue 30's reasoning references) in every format ----------------------------------------

def reasoning_objects(h, w):
    """Two kept plain pairs, a kept reasoning pair to the first and a rejected one to the second (``--all``)."""
    from sculpt.annotation import reasoning

    objects = [{**obj((0, 0, w // 2, h // 2), 0.9, "the cup at the top left", phrase="cup", size=(h, w)), "style": "plain"},
               {**obj((w // 2, h // 2, w, h), 0.8, "the plate at the bottom right", phrase="plate", size=(h, w)),
                "style": "plain"}]
    objects.append({**schema.new_object(**reasoning.reasoning_fields(objects, 0, "what one drinks hot coffee from")),
                    "iou": 0.85, "kept": True})
    objects.append({**schema.new_object(**reasoning.reasoning_fields(objects, 1, "what holds the meal")),
                    "iou": 0.2, "kept": False, "reject_reason": "low_iou"})
    return objects


STYLES = {0: "plain", 1: "plain", 2: "reasoning", 3: "reasoning"}  # reasoning_objects' pairs by position


def to_schema_version_4(path):
    """Rewrite an output file as sculpt wrote it before issue 30: objects without style and target, no chat column."""
    import pyarrow as pa

    old_object = pa.struct([f for f in schema.OBJECT_TYPE if f.name not in ("style", "target")])
    old_schema = pa.schema([f.with_type(pa.list_(old_object)) if f.name == "objects" else f
                            for f in schema.OUTPUT_SCHEMA if f.name != "chat"])
    rows = [{k: v for k, v in r.items() if k != "chat"} for r in pq.read_table(path).to_pylist()]
    for r in rows:
        r["objects"] = [{k: v for k, v in o.items() if k not in ("style", "target")} for o in r["objects"] or []]
    pq.write_table(pa.Table.from_pylist(rows, schema=old_schema), path)


def exported_styles(out, dest):
    """{format: {(index, object): style}} of every pair (``--all``) in each of gseval, coco (its annotations and its
    refs), hf, labelstudio (each result's meta) and review (the Label Studio tasks ``sculpt review sample`` builds)."""
    from sculpt.outputs import review

    found = {}
    assert cli.main(["export", out, str(dest / "g.jsonl"), "--format", "gseval", "--all"]) == 0
    found["gseval"] = {(r["index"], r["object"]): r["style"] for r in read_jsonl(dest / "g.jsonl")}
    assert cli.main(["export", out, str(dest / "coco.json"), "--format", "coco", "--all"]) == 0
    coco = json.loads((dest / "coco.json").read_text())
    found["coco annotations"] = {(a["index"], a["object"]): a["style"] for a in coco["annotations"]}
    found["coco refs"] = {(r["index"], r["object"]): r["style"] for r in coco["refs"]}
    assert cli.main(["export", out, str(dest / "hf"), "--format", "hf", "--all"]) == 0
    table = pq.ParquetDataset(str(dest / "hf")).read()
    assert table.schema.equals(export.PAIR_SCHEMA)
    found["hf"] = {(r["index"], r["object"]): r["style"] for r in table.to_pylist()}
    assert cli.main(["export", out, str(dest / "ls.json"), "--format", "labelstudio", "--all"]) == 0
    results = [r for t in json.loads((dest / "ls.json").read_text()) for p in t["predictions"] for r in p["result"]]
    assert {r["type"] for r in results} == {"brushlabels", "textarea", "rectanglelabels"}
    by_pair = {}
    for r in results:  # every result of a pair (mask, expression, box) says the same style
        by_pair.setdefault((r["meta"]["index"], r["meta"]["object"]), set()).add(r["meta"]["style"])
    assert all(len(styles) == 1 for styles in by_pair.values())
    found["labelstudio"] = {key: styles.pop() for key, styles in by_pair.items()}
    review.sample(out, str(dest / "review"), n=50)
    tasks = json.loads((dest / "review" / "tasks.json").read_text())
    found["review"] = {(t["data"]["index"], t["data"]["object"]): t["data"]["style"] for t in tasks}
    assert all(t["data"]["style"] in t["data"]["facts"].split(" · ") for t in tasks)  # the reviewer reads it
    return found


def test_every_format_says_a_pairs_style_plain_or_reasoning(tmp_path):
    pictures = [samples.jpeg_bytes(gradient(20, 24))] * 2
    out = shard_output(tmp_path, pictures, reasoning_objects)
    found = exported_styles(out, tmp_path)
    assert set(found) == {"gseval", "coco annotations", "coco refs", "hf", "labelstudio", "review"}
    expected = {(index, position): style for index in (0, 1) for position, style in STYLES.items()}
    for fmt, styles in found.items():
        assert set(styles) == set(expected), fmt  # every pair is there (two reasoning ones an image) ...
        assert styles == expected, fmt  # ... and says its style
    # the exported reasoning pair is its target's mask with the reasoning expression
    [line] = [r for r in read_jsonl(tmp_path / "g.jsonl") if (r["index"], r["object"]) == (0, 2)]
    assert line["label"] == "what one drinks hot coffee from" and line["kept"] is True
    target = next(r for r in read_jsonl(tmp_path / "g.jsonl") if (r["index"], r["object"]) == (0, 0))
    assert line["segmentation"] == target["segmentation"]
    # kept pairs only: the rejected reasoning pair is left out, the kept one stays reasoning
    export.export(out, str(tmp_path / "kept.jsonl"), "gseval")
    assert {(r["index"], r["object"]): r["style"] for r in read_jsonl(tmp_path / "kept.jsonl")} == \
        {(i, p): s for (i, p), s in expected.items() if p != 3}


def test_outputs_without_style_export_their_pairs_as_plain(tmp_path):
    """Outputs of schema version 4 (objects without style) and objects whose style is null export style plain."""
    pictures = [samples.jpeg_bytes(gradient(20, 24))] * 2
    out = shard_output(tmp_path, pictures, lambda h, w: [o for o in reasoning_objects(h, w)[:2]])
    to_schema_version_4(f"{out}/sa_000000.parquet")
    objects = pq.read_schema(f"{out}/sa_000000.parquet").field("objects").type.value_type
    assert "style" not in [f.name for f in objects] and "category" in [f.name for f in objects]
    found = exported_styles(out, tmp_path)
    expected = {(index, position): "plain" for index in (0, 1) for position in (0, 1)}
    for fmt, styles in found.items():
        assert set(styles) == set(expected) and styles == expected, fmt
    # schema version 5, style null (an object the refer stage did not write): plain as well
    (tmp_path / "v5").mkdir()
    out = shard_output(tmp_path / "v5", pictures)  # obj(): no style
    assert pq.read_table(f"{out}/sa_000000.parquet").to_pylist()[0]["objects"][0]["style"] is None
    export.export(out, str(tmp_path / "v5.jsonl"), "gseval")
    lines = read_jsonl(tmp_path / "v5.jsonl")
    assert len(lines) == 2 and {line["style"] for line in lines} == {"plain"}
