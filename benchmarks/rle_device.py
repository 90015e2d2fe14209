"""RLE of full-resolution masks: today's CPU path against run lengths counted with torch where the masks are.

Masks: smooth random blobs at 1500 x 2250 (coarse Gaussian noise brought up bilinear, thresholded — edges like
SAM2's upsampled logits), in batches of 10 and 50. Paths, each on the same masks, best of ``--repeat``:

- ``encode_many (numpy)``: ``sculpt.annotation.rle.encode_many`` on the C-contiguous N x H x W bool array — what the mask
  and verify stages did before (after ``.cpu().numpy()`` of the masks): a column-major copy, pycocotools' encode
- ``encode_tensors (cpu)``: ``sculpt.annotation.rle.encode_tensors`` on a CPU bool tensor — runs counted with torch, only
  pycocotools' compression on the host; ``compress only`` is pycocotools' share of it (``frPyObjects`` on the
  run lengths, computed beforehand)
- on CUDA, when there is one: ``encode_tensors (cuda)`` on the masks in GPU memory (synchronised; includes the
  copy of the run lengths to the host), and ``.cpu().numpy() + encode_many``, what it replaces there

Every path's output is asserted equal, byte for byte, to ``pycocotools.mask.encode`` of the same masks.

    .venv/bin/python benchmarks/rle_device.py [--masks 10 50] [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time


HEIGHT, WIDTH = 1500, 2250


def blobs(n: int, seed: int = 0):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((n, 1, 12, 18), generator=g)
    full = F.interpolate(coarse, (HEIGHT, WIDTH), mode="bilinear", align_corners=False)[:, 0]
    return full > 0.8  # ~20 % of the pixels, a few blobs per mask


def best(fn, repeat: int, sync=lambda: None) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--masks", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--threads", type=int, default=1, help="torch's CPU threads (default 1: per core)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    import torch
    from pycocotools import mask as coco_mask

    from sculpt.annotation import rle

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    print(f"masks {HEIGHT}x{WIDTH}, torch {torch.__version__}, {args.threads} CPU thread(s), "
          f"device: {torch.cuda.get_device_name() if cuda else 'no CUDA'}; best of {args.repeat}, ms per batch")
    header = ["masks", "runs/mask", "encode_many (numpy)", "encode_tensors (cpu)", "compress only", "ratio cpu"]
    if cuda:
        header += [".cpu().numpy() + encode_many", "encode_tensors (cuda)", "ratio cuda"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for n in args.masks:
        masks = blobs(n, seed=n)
        array = masks.numpy()
        want = [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}
                for r in (coco_mask.encode(np.asfortranarray(m.astype(np.uint8))) for m in array)]
        rle.encode_tensors(masks[:1])  # warm-up

        t_numpy, got = best(lambda: rle.encode_many(array), args.repeat)
        assert got == want, "encode_many differs from pycocotools.mask.encode"
        t_torch, got = best(lambda: rle.encode_tensors(masks), args.repeat)
        assert got == want, "encode_tensors (cpu) differs from pycocotools.mask.encode"
        runs = rle.run_lengths(masks)
        dicts = [{"size": [HEIGHT, WIDTH], "counts": r} for r in runs]
        t_compress, _ = best(lambda: coco_mask.frPyObjects(dicts, HEIGHT, WIDTH), args.repeat)
        row = [n, f"{np.mean([len(r) for r in runs]):.0f}", f"{t_numpy * 1e3:.1f}", f"{t_torch * 1e3:.1f}",
               f"{t_compress * 1e3:.1f}", f"{t_numpy / t_torch:.2f}"]
        if cuda:
            on_gpu = masks.cuda()
            rle.encode_tensors(on_gpu[:1])  # warm-up: kernels, allocator
            sync = torch.cuda.synchronize
            t_old, got = best(lambda: rle.encode_many(on_gpu.cpu().numpy()), args.repeat, sync)
            assert got == want, ".cpu().numpy() + encode_many differs from pycocotools.mask.encode"
            t_cuda, got = best(lambda: rle.encode_tensors(on_gpu), args.repeat, sync)
            assert got == want, "encode_tensors (cuda) differs from pycocotools.mask.encode"
            row += [f"{t_old * 1e3:.1f}", f"{t_cuda * 1e3:.1f}", f"{t_old / t_cuda:.1f}"]
        print("| " + " | ".join(str(v) for v in row) + " |", flush=True)
    print("identical bytes: every path equals pycocotools.mask.encode on every mask")


if __name__ == "__main__":
    main()
