"""Images 1, 2 and 3 pixels high or wide go through every stage with their true size (no processor guesses
the channel axis from an H×W×3 array whose H or W is 1 or 3), or come out as error rows that say why."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sam2")

from sculpt.annotation import images  # noqa: E402
from sculpt.testing import samples
from sculpt import schema
from sculpt.io import shards
from sculpt.testing import kit  # noqa: E402
from sculpt.stage import StageActor  # noqa: E402

SHAPES = [(1, 60), (2, 60), (3, 60), (60, 1), (60, 2), (60, 3), (1, 1), (3, 3)]  # (height, width)


def thin_rows(tmp_path):
    photo = samples.photo("chelsea")
    members = []
    for i, (h, w) in enumerate(SHAPES):
        pixels = np.ascontiguousarray(photo[:h, :w])
        members += [(f"sa_{i}.jpg", samples.jpeg_bytes(pixels)), (f"sa_{i}.json", samples.sa1b_json(i, pixels))]
    path = tmp_path / "sa_000003.tar"
    samples.write_tar(str(path), members)
    rows = [row for batch in shards.read_shard(str(path)) for row in batch]
    for row in rows:
        row["caption"] = kit.CAPTION
    return rows


def test_thin_images_keep_their_true_size_through_ground_mask_and_verify(tiny_models, tmp_path):
    from actors.ground import Grounder
    from actors.mask import Masker
    from actors.verify import Verifier

    rows = thin_rows(tmp_path)
    assert [(r["height"], r["width"]) for r in rows] == SHAPES
    assert all(images.load_rgb(r["image_bytes"]).shape == (h, w, 3) for r, (h, w) in zip(rows, SHAPES))
    table = schema.to_table(rows)
    table = StageActor(Grounder(model=tiny_models["ground"], num_beams=1, max_new_tokens=64))(table)
    table = StageActor(Masker(model=tiny_models["mask"]))(table)
    rows = table.to_pylist()
    for row in rows:
        for obj in row["objects"]:
            obj["expression"] = kit.EXPRESSION
    rows = StageActor(Verifier(model=tiny_models["verify"]))(schema.to_table(rows)).to_pylist()

    assert [r["status"] for r in rows] == ["ok"] * len(SHAPES), [r["error"] for r in rows]
    assert sum(bool(r["objects"]) for r in rows) >= 5  # 2- and 3-pixel images get boxes; 1-pixel boxes are degenerate
    for row, (h, w) in zip(rows, SHAPES):
        assert (row["height"], row["width"]) == (h, w)
        for obj in row["objects"]:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert obj["mask"]["size"] == [h, w] and obj["error"] is None
            assert 0.0 <= obj["iou"] <= 1.0
