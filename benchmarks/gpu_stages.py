"""Each model stage on a CUDA GPU as the pipeline runs it: ms per image, GPU busy fraction, host ms per image.

Writes random-weight checkpoints at the published sizes in each model's real format (seconds on a GPU machine:
nothing is downloaded) — Florence-2-large, SAM2.1-hiera-large, EVF-SAM2 (BEiT-3-large + SAM2-L) — and runs the
stage classes (``actors.ground.Grounder``, ``actors.mask.Masker``, ``actors.verify.Verifier``) through
``sculpt.stage.StageActor`` on synthetic 2250x1500 JPEGs with ``--objects`` boxes/expressions each, in the
precision policy's default dtype. GPU busy = CUDA kernel time (torch.profiler) over wall time; host = wall minus
kernel time. The VLM runs in vLLM, which this script does not start: time it from its FLOPs (docs/BENCHMARKS.md)
or with vLLM's own benchmarks.

    python benchmarks/gpu_stages.py [--images 16] [--objects 10] [--stages ground mask verify] [--dir /tmp/ckpt]
    python benchmarks/gpu_stages.py --tiny       # the same code on the tiny kit, on the CPU (a dry run)

Feed the printed GPU ms per image to ``sculpt size --gpus N --cost ground=MS ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

WIDTH, HEIGHT = 2250, 1500


def florence2_large(directory: str) -> str:
    """Florence-2-large's published architecture (florence-community/Florence-2-large config), random weights; the
    tokenizer is the kit's small BPE (token ids only shape the prompt, not the cost)."""
    import torch
    from transformers import CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    from sculpt.testing import tiny_florence2

    kit = tiny_florence2.write(os.path.join(directory, "florence2-kit"), train=False)
    image_processor = CLIPImageProcessor(
        size={"height": 768, "width": 768}, crop_size={"height": 768, "width": 768}, do_center_crop=False, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], image_seq_length=577)  # 24 x 24 + 1
    processor = Florence2Processor(image_processor=image_processor, tokenizer=Florence2Processor.from_pretrained(kit).tokenizer,
                                   post_processor_config=tiny_florence2.POST_PROCESSOR_CONFIG)
    text = dict(model_type="bart", vocab_size=51289, d_model=1024, encoder_layers=12, decoder_layers=12,
                encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                max_position_embeddings=1024, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                forced_eos_token_id=2)
    vision = dict(depths=[1, 1, 9, 1], embed_dim=[256, 512, 1024, 2048], num_heads=[8, 16, 32, 64],
                  num_groups=[8, 16, 32, 64], window_size=12, projection_dim=1024, drop_path_rate=0.0)
    config = Florence2Config(text_config=text, vision_config=vision,
                             image_token_id=processor.tokenizer.convert_tokens_to_ids("<image>"))
    with torch.device("cuda"):
        model = Florence2ForConditionalGeneration(config)
    out = os.path.join(directory, "florence2-large")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def sam21_large(directory: str) -> str:
    """SAM2.1-hiera-large from sam2's own config, random weights, under its official checkpoint name."""
    import torch
    from sam2.build_sam import build_sam2

    out = os.path.join(directory, "sam2.1-large")
    os.makedirs(out, exist_ok=True)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_l.yaml", None, device="cuda")
    torch.save({"model": model.state_dict()}, os.path.join(out, "sam2.1_hiera_large.pt"))
    return out


def evf_sam2_large(directory: str) -> str:
    """EVF-SAM2 at the reference's sizes (BEiT-3-large, SAM2 hiera-l), random weights, the kit's tokenizer model."""
    import json
    import shutil

    from safetensors.torch import save_file

    from sculpt.testing import tiny_evf_sam2
    from sculpt.models.evf_sam2 import TOKENIZER_FILE, EvfConfig, EvfSam2

    kit = tiny_evf_sam2.write(os.path.join(directory, "evf-kit"))
    out = os.path.join(directory, "evf-sam2")
    os.makedirs(out, exist_ok=True)
    for name in (TOKENIZER_FILE, "tokenizer_config.json"):
        shutil.copy(os.path.join(kit, name), out)
    config = EvfConfig()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config.to_json(), f)
    model = EvfSam2(config, device="cuda")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    return out


def rows(images: int, objects: int, width: int, height: int):
    import numpy as np
    from PIL import Image

    from sculpt.testing import samples
    from sculpt import schema
    from sculpt.testing import kit

    rng = np.random.default_rng(0)
    photo = np.asarray(Image.fromarray(samples.photo("astronaut")).resize((width, height)))
    encoded = samples.jpeg_bytes(photo)
    out = []
    for i in range(images):
        boxes = []
        for _ in range(objects):
            x0, y0 = rng.uniform(0, width * 0.7), rng.uniform(0, height * 0.7)
            boxes.append([float(x0), float(y0), float(x0 + rng.uniform(50, width * 0.3)), float(y0 + rng.uniform(50, height * 0.3))])
        row = schema.new_row("bench", i, f"sa_{i}", image_bytes=encoded, width=width, height=height, caption=" ".join([kit.CAPTION] * 4))
        row["objects"] = [{"phrase": f"object {j}", "box": box, "expression": f"the object number {j} on the left of the scene"}
                          for j, box in enumerate(boxes)]
        out.append(row)
    return out


def measure(stage, table, cuda: bool) -> dict:
    from sculpt.stage import StageActor

    actor = StageActor(stage)
    actor(table.slice(0, 2))  # warm-up: kernels, allocator, cuDNN choices
    if cuda:
        import torch
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            started = time.perf_counter()
            out = actor(table)
            torch.cuda.synchronize()
            wall = time.perf_counter() - started
        device = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    else:
        started = time.perf_counter()
        out = actor(table)
        wall, device = time.perf_counter() - started, 0.0
    n = table.num_rows
    return {"errors": [e for e in out["error"].to_pylist() if e], "ms_per_image": 1000 * wall / n, "gpu_ms_per_image": 1000 * device / n, "busy": device / wall if wall else 0.0,
            "host_ms_per_image": 1000 * (wall - device) / n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--objects", type=int, default=10)
    parser.add_argument("--stages", nargs="+", default=["ground", "mask", "verify"], choices=["ground", "mask", "verify"])
    parser.add_argument("--dir", help="where checkpoints are written (default: a temporary directory)")
    parser.add_argument("--tiny", action="store_true", help="a dry run on the CPU with the tiny kit")
    args = parser.parse_args()

    import torch

    from actors.ground import Grounder
    from actors.mask import Masker
    from actors.verify import Verifier
    from sculpt.models import precision
    from sculpt import schema

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("gpu_stages: needs a CUDA GPU (none is visible here); `--tiny` runs the same code on the CPU with the "
              "tiny kit", file=sys.stderr)
        return 2
    directory = args.dir or tempfile.mkdtemp(prefix="sculpt-gpu-stages-")
    started = time.perf_counter()
    if args.tiny:
        from sculpt.testing.kit import write_tiny_models

        paths = write_tiny_models(directory)
        width, height = 451, 300
    else:
        writers = {"ground": florence2_large, "mask": sam21_large, "verify": evf_sam2_large}
        paths = {stage: writers[stage](directory) for stage in args.stages}
        width, height = WIDTH, HEIGHT
    print(f"checkpoints in {directory} ({time.perf_counter() - started:.0f} s); {args.images} images of "
          f"{width}x{height}, {args.objects} objects each; {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}",
          flush=True)
    # the tiny Florence-2 has 160 text positions; the real one 1024 (the stage's default max_new_tokens)
    ground = {"max_new_tokens": 64} if args.tiny else {}
    stages = {"ground": lambda: Grounder(model=paths["ground"], **ground), "mask": lambda: Masker(model=paths["mask"]),
              "verify": lambda: Verifier(model=paths["verify"])}
    base = rows(args.images, args.objects, width, height)
    dtype = precision.resolve()[1]
    for name in args.stages:
        table_rows = [dict(r) for r in base]
        if name == "ground":
            for r in table_rows:
                r["objects"] = []
        if name == "verify":  # the verifier needs masks: full-box masks stand in for SAM2's
            from sculpt.annotation import rle
            import numpy as np

            for r in table_rows:
                for obj in r["objects"]:
                    mask = np.zeros((height, width), bool)
                    x0, y0, x1, y1 = (int(v) for v in obj["box"])
                    mask[y0:y1, x0:x1] = True
                    obj["mask"] = rle.encode(mask)
        stage = stages[name]()
        figures = measure(stage, schema.to_table(table_rows), cuda)
        errors = figures["errors"]
        print(f"{name:7s} {figures['ms_per_image']:8.1f} ms/img | GPU {figures['gpu_ms_per_image']:7.1f} ms/img "
              f"(busy {figures['busy']:.0%}) | host {figures['host_ms_per_image']:7.1f} ms/img | {dtype}"
              + (f" | {len(errors)} errors, first: {errors[0]}" if errors else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
