"""SA-1B-sized inputs for the benchmarks: 2250 x 1500 photographs with object-like masks, in SA-1B's tar format.

Images are scikit-image's photographs (sculpt.testing.samples.PHOTOS) resized to SA-1B's size (short side 1500, the
portrait one turned). Masks are regions found by Felzenszwalb's graph segmentation at three scales on a 1/4-size
copy — fine parts, objects and large regions that overlap across scales, as SA-1B's multi-granular masks do —
upsampled with smooth (bilinear, > 0.5) edges. Members are written by sculpt.testing.samples (SA-1B's json layout, masks
encoded by pycocotools).
"""

from __future__ import annotations

import numpy as np

from sculpt.testing import samples

WIDTH, HEIGHT = 2250, 1500


def photo(name: str) -> np.ndarray:
    import cv2

    image = samples.photo(name)
    size = (HEIGHT, WIDTH) if image.shape[0] > image.shape[1] else (WIDTH, HEIGHT)
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)


def object_masks(image: np.ndarray, count: int, min_fraction: float = 0.001) -> list[np.ndarray]:
    """Up to ``count`` full-resolution boolean masks of regions of the image, largest scale first."""
    import cv2
    from skimage.segmentation import felzenszwalb

    height, width = image.shape[:2]
    small = cv2.resize(image, (width // 4, height // 4), interpolation=cv2.INTER_AREA)
    per_scale = []
    for scale in (2000, 500, 120):
        labels = felzenszwalb(small, scale=scale, sigma=0.8, min_size=50)
        fractions = np.bincount(labels.ravel()) / labels.size
        per_scale.append([(labels == k) for k in np.argsort(-fractions) if min_fraction <= fractions[k] < 0.9])
    regions = []  # the same share from every scale, spread over each scale's sizes
    for i, found in enumerate(per_scale):
        want = min(len(found), (count - len(regions)) // (len(per_scale) - i))
        regions += [found[j] for j in np.linspace(0, len(found) - 1, want).round().astype(int)] if want else []
    return [cv2.resize(region.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
            for region in regions]


def write_shard(path: str, images: int, masks_per_image: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """An SA-1B-format tar of ``images`` photographs; returns the (image, masks) written."""
    members, written = [], []
    for i in range(images):
        image = photo(samples.PHOTOS[i % len(samples.PHOTOS)])
        masks = object_masks(image, masks_per_image)
        members += [(f"./sa_{i + 1}.jpg", samples.jpeg_bytes(image)), (f"./sa_{i + 1}.json", samples.sa1b_json(i + 1, image, masks))]
        written.append((image, masks))
    samples.write_tar(path, members)
    return written
