"""Is EVF-SAM2's SAM2 image embedding worth reusing from the mask stage? Its share of the verify step.

Measured: one SA-1B-sized image (2250x1500) through the verify stage (decode, EVF-SAM2 on all its expressions,
RLE, IoU) against the SAM2 image embedding alone (preprocessing + encoder), median of --repeats, on this
machine, with the tiny checkpoint (or --evf DIR). Estimated: the large configuration (YxZhang/evf-sam2) by
FLOPs counted on the meta device (no weights, no compute). With --evf DIR --sam2-checkpoint PT it also says
whether a sam2 checkpoint (e.g. the masker's) has EVF-SAM2's image-feature weights.

    .venv/bin/python benchmarks/verify_embedding.py [--expressions 10] [--repeats 3] [--evf DIR] [--sam2-checkpoint PT]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from actors.verify import Verifier  # noqa: E402
from sculpt.annotation import rle  # noqa: E402
from sculpt.testing import samples
from sculpt import schema
from sculpt.models import evf_sam2  # noqa: E402
from sculpt.testing import tiny_evf_sam2  # noqa: E402

EXPRESSIONS = [
    "the man in the white space suit on the left holding a helmet in his right hand",
    "the american flag in the top left corner behind the astronaut's shoulder",
    "the dark blue background filling the right half of the picture",
]


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measured(directory, expressions, repeats):
    image = np.asarray(Image.fromarray(samples.photo("astronaut")).resize((1500, 2250)))
    height, width = image.shape[:2]
    sam_mask = np.zeros((height, width), bool)
    sam_mask[: height // 2, : width // 3] = True
    texts = [EXPRESSIONS[i % len(EXPRESSIONS)] for i in range(expressions)]
    objects = [{"mask": rle.encode(sam_mask), "expression": t} for t in texts]
    jpeg = samples.jpeg_bytes(image)

    stage = Verifier(model=directory, device="cpu")
    stage.setup()

    def verify_step():
        row = schema.new_row("u", 0, "a", image_bytes=jpeg, width=width, height=height, objects=[dict(o) for o in objects])
        stage.process([row])
        assert row["status"] == "ok", row["error"]

    verify_step()  # warm-up
    embed = median_seconds(lambda: stage.model.image_features(image), repeats)
    whole = median_seconds(verify_step, repeats)
    print(f"measured ({directory}, CPU, {torch.get_num_threads()} threads, {expressions} expressions, {width}x{height}):")
    print(f"  SAM2 image embedding {embed:.3f} s; whole verify step {whole:.3f} s; embedding share {embed / whole:.0%}")


def large_flops(expressions, tokens=24):
    from torch.utils.flop_counter import FlopCounterMode

    model = evf_sam2.EvfSam2(evf_sam2.EvfConfig(), device="meta").eval()

    def gflops(fn):
        with FlopCounterMode(display=False) as counter:  # needs autograd on (module tracking); meta: no compute
            out = fn()
        return out, counter.get_total_flops() / 1e9

    features, embed = gflops(lambda: model.image_features(torch.empty(1, 3, 1024, 1024, device="meta")))
    ids = torch.zeros(expressions, tokens, dtype=torch.long, device="meta")
    prompts, beit = gflops(lambda: model.prompts(torch.empty(1, 3, 224, 224, device="meta"), ids, torch.ones_like(ids)))
    _, decode = gflops(lambda: model.decode(features, prompts))
    per_expression = (beit + decode) / expressions
    print(f"large configuration (YxZhang/evf-sam2) by FLOPs, {tokens} text tokens per expression:")
    print(f"  SAM2 hiera-l image embedding {embed:.0f} GFLOP; per expression: BEiT-3-L {beit / expressions:.0f} GFLOP"
          f" + mask decoder {decode / expressions:.1f} GFLOP")
    for k in (1, 5, 10, 20):
        print(f"  {k:2d} expressions: embedding share {embed / (embed + k * per_expression):.0%}")


def weights_check(directory, sam2_checkpoint):
    model = evf_sam2.EvfSam2(evf_sam2.EvfConfig.load(os.path.join(directory, "config.json")), empty=True)
    evf_sam2.load_weights(model, directory)
    state = torch.load(sam2_checkpoint, map_location="cpu", weights_only=True)["model"]
    print(f"{sam2_checkpoint} has EVF-SAM2's image-feature weights: {evf_sam2.same_image_features(model, state)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expressions", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--evf", help="EVF-SAM2 checkpoint directory (default: a tiny one written to a temp dir)")
    parser.add_argument("--sam2-checkpoint", help="a sam2 .pt ({'model': state_dict}) to compare with --evf")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.evf or tiny_evf_sam2.write(os.path.join(tmp, "evf-sam2-tiny"))
        measured(directory, args.expressions, args.repeats)
        if args.evf and args.sam2_checkpoint:
            weights_check(args.evf, args.sam2_checkpoint)
    large_flops(args.expressions)


if __name__ == "__main__":
    main()
