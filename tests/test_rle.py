import numpy as np
import pytest

from sculpt.annotation import rle


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


# ---------------------------------------------------------------- the torch path: runs counted where the masks are


def reference(masks: np.ndarray) -> list[dict]:
    """pycocotools.mask.encode, one mask at a time, as it is documented to be called."""
    from pycocotools import mask as coco_mask

    return [coco_mask.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]


def assert_same_bytes(masks: np.ndarray, **kw):
    import torch

    got = rle.encode_tensors(torch.from_numpy(masks), **kw)
    want = reference(masks)
    assert len(got) == len(want) == len(masks)
    for g, w in zip(got, want):
        assert isinstance(g["counts"], str) and type(g["size"]) is list and all(type(v) is int for v in g["size"])
        assert g["counts"].encode("ascii") == w["counts"] and g["size"] == list(w["size"])
    assert got == rle.encode_many(masks)


def blobs(rng, n: int, height: int, width: int) -> np.ndarray:
    """Smooth random shapes: coarse noise brought to full size (nearest), so runs are long and end anywhere."""
    coarse = rng.random((n, max(1, height // 50), max(1, width // 50))) > 0.6
    rows = np.arange(height) * coarse.shape[1] // height
    cols = np.arange(width) * coarse.shape[2] // width
    return coarse[:, rows][:, :, cols]


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (3, 5), (2, 2), (37, 53), (64, 48), (1, 300), (300, 1), (0, 4), (4, 0)])
def test_tensor_path_gives_pycocotools_bytes_on_random_masks(size):
    rng = np.random.default_rng(sum(size))
    for density in (0.05, 0.5, 0.95):
        assert_same_bytes(rng.random((6, *size)) < density)


def test_tensor_path_on_empty_full_and_single_pixel_masks_in_one_batch():
    h, w = 4, 6
    masks = np.zeros((9, h, w), bool)
    masks[1] = True                     # full: runs [0, 24]
    masks[2, 0, 0] = True               # first pixel only: starts with a run of 0 zeros
    masks[3, -1, -1] = True             # last pixel only: the last run is the ones
    masks[4, 1, 2] = True
    masks[6] = True                     # full again after an empty one
    masks[7] = True
    masks[7, 0, 0] = False              # full but the first pixel
    masks[8] = True
    masks[8, -1, -1] = False            # full but the last pixel
    assert_same_bytes(masks)
    for one in masks:
        assert_same_bytes(one[None])
    assert_same_bytes(np.zeros((3, h, w), bool))
    assert_same_bytes(np.ones((3, h, w), bool))


def test_tensor_path_on_runs_touching_column_boundaries():
    h, w = 5, 7
    masks = np.zeros((8, h, w), bool)
    masks[0, :, 0] = True               # a whole first column
    masks[1, :, -1] = True              # a whole last column
    masks[2, :, ::2] = True             # every other column: each run is exactly one column
    masks[3, -1, :] = True              # bottom row: a run of 1 at the end of every column
    masks[4, 0, :] = True               # top row: a run of 1 at the start of every column
    masks[5, 0, :], masks[5, -1, :] = True, True  # a run crossing every column boundary (bottom, next top)
    masks[6, 3:, 2], masks[6, :2, 3] = True, True  # one run split across a boundary
    masks[7] = np.indices((h, w)).sum(0) % 2 == 0  # checkerboard: every pixel its own run
    assert_same_bytes(masks)
    assert_same_bytes(masks.transpose(0, 2, 1).copy())


def test_tensor_path_on_large_masks_and_across_chunks():
    rng = np.random.default_rng(7)
    masks = blobs(rng, 3, 1500, 2250)
    masks[1] = rng.random((1500, 2250)) > 0.5  # noise: about 1.7 million runs
    assert_same_bytes(masks)
    small = blobs(rng, 19, 61, 83)
    small[4], small[11] = False, True
    for chunk in (1, 3, 8, 19, 100):
        assert_same_bytes(small, chunk=chunk)


def test_tensor_path_takes_empty_batches_views_and_0_1_masks():
    import torch

    assert rle.encode_tensors(torch.zeros((0, 15, 20), dtype=torch.bool)) == []
    assert rle.run_lengths(torch.zeros((0, 15, 20), dtype=torch.bool)) == []
    rng = np.random.default_rng(3)
    masks = rng.random((4, 2, 30, 41)) > 0.5
    view = torch.from_numpy(masks)[:, 1]  # not contiguous, as mask.py slices N×1×H×W
    assert rle.encode_tensors(view) == rle.encode_many(masks[:, 1])
    assert rle.encode_tensors(view.to(torch.uint8)) == rle.encode_many(masks[:, 1])
    assert rle.encode_tensors(view.transpose(1, 2)) == rle.encode_many(masks[:, 1].transpose(0, 2, 1))
    with pytest.raises(ValueError, match="N×H×W"):
        rle.encode_tensors(view[0])


def test_run_lengths_are_cocos_uncompressed_counts():
    import torch

    mask = np.array([[1, 0, 0], [1, 1, 0]], bool)  # column-major: 1 1 0 1 0 0
    zeros = np.zeros((2, 3), bool)
    runs = rle.run_lengths(torch.from_numpy(np.stack([mask, zeros, ~zeros, ~mask])))
    assert [r.tolist() for r in runs] == [[0, 2, 1, 1, 2], [6], [0, 6], [2, 1, 1, 2]]
    rng = np.random.default_rng(5)
    masks = rng.random((5, 13, 17)) > 0.5
    for runs, m in zip(rle.run_lengths(torch.from_numpy(masks)), masks):
        flat = m.T.ravel()
        assert runs.sum() == flat.size and runs[1:].min() > 0
        assert np.array_equal(np.repeat(np.arange(len(runs)) % 2, runs).astype(bool), flat)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()")
def test_tensor_path_on_cuda_gives_the_same_bytes():
    import torch

    rng = np.random.default_rng(11)
    masks = blobs(rng, 5, 1500, 2250)
    masks[2] = rng.random((1500, 2250)) > 0.5
    assert rle.encode_tensors(torch.from_numpy(masks).cuda()) == [
        {"size": list(r["size"]), "counts": r["counts"].decode("ascii")} for r in reference(masks)]
