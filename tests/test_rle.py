import numpy as np
import pytest

from sculpt import rle


def test_roundtrip_and_area_match_the_mask():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.6
    encoded = rle.encode(mask)
    assert encoded["size"] == [37, 53] and isinstance(encoded["counts"], str)
    assert np.array_equal(rle.decode(encoded), mask)
    assert rle.area(encoded) == mask.sum()


def test_encode_many_equals_encode_one_by_one():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 20, 31)) > 0.5
    assert rle.encode_many(masks) == [rle.encode(m) for m in masks]


def test_iou_golden_values():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :5] = True  # 50 px
    b[:, 2:7] = True  # 50 px, 30 shared
    assert rle.iou(rle.encode(a), rle.encode(b)) == pytest.approx(30 / 70)
    assert rle.iou(rle.encode(a), rle.encode(a)) == 1.0
    empty = rle.encode(np.zeros((10, 10), bool))
    assert rle.iou(empty, rle.encode(a)) == 0.0
    with pytest.raises(ValueError, match="different sizes"):
        rle.iou(rle.encode(a), rle.encode(np.zeros((5, 10), bool)))


def test_decodes_sa1b_style_counts():
    from pycocotools import mask as coco_mask

    mask = np.zeros((6, 4), np.uint8)
    mask[1:4, 1:3] = 1
    reference = coco_mask.encode(np.asfortranarray(mask))
    as_in_json = {"size": reference["size"], "counts": reference["counts"].decode()}
    assert np.array_equal(rle.decode(as_in_json), mask.astype(bool))


def test_decode_masks_of_a_row():
    from sculpt import schema

    a, b = np.zeros((3, 5), bool), np.ones((3, 5), bool)
    a[1, 2] = True
    row = schema.new_row("u", 0, "k", width=5, height=3, objects=[{"mask": rle.encode(a)}, {"mask": rle.encode(b)}])
    masks = schema.decode_masks(row)
    assert masks.shape == (2, 3, 5) and np.array_equal(masks[0], a) and masks[1].all()
    assert schema.decode_masks(schema.new_row("u", 1, "k", width=5, height=3)).shape == (0, 3, 5)
