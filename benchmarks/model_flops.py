"""FLOPs per image of the default models, counted by torch's FlopCounterMode on the meta device (no weights, no
compute), for the H100 estimate in docs/BENCHMARKS.md.

Architectures are built from their published sizes: InternVL3-8B (InternViT-300M-448px-V2.5 + Qwen2.5-7B, pixel
shuffle 0.5: 256 tokens per 448 tile), Florence-2-large (DaViT 256/512/1024/2048, depths 1/1/9/1; BART-large
text model, 12 + 12 layers), EVF-SAM2 and its SAM2 hiera-l image encoder (sculpt.models.evf_sam2's default large
configuration). A multiply-add counts as two FLOPs; attention is counted unmasked (an overestimate for causal).

    PYTHONPATH=. python benchmarks/model_flops.py [--tiles 7] [--caption-tokens 225] [--objects 10]
"""

from __future__ import annotations

import argparse


import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def gflops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def internvl3_8b():
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    config = InternVLConfig(
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                           image_size=[448, 448], patch_size=[14, 14], norm_type="layer_norm", use_qk_norm=False),
        text_config=dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, vocab_size=151674, tie_word_embeddings=False),
        downsample_ratio=0.5, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return InternVLForConditionalGeneration(config).eval()


def florence2_large():
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    config = Florence2Config(
        vision_config=dict(embed_dim=[256, 512, 1024, 2048], num_heads=[8, 16, 32, 64], num_groups=[8, 16, 32, 64],
                           depths=[1, 1, 9, 1], window_size=12, projection_dim=1024),
        text_config=dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                         decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, vocab_size=51289),
    )
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")  # the sdpa mask path reads tensor values, which meta tensors lack
    return model


def params(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", type=int, default=7, help="InternVL tiles per image (6 + thumbnail for 3:2 images)")
    parser.add_argument("--caption-tokens", type=int, default=225, help="caption length in tokens")
    parser.add_argument("--objects", type=int, default=10, help="objects per image (refer, mask, verify)")
    args = parser.parse_args()
    meta_ids = lambda n: torch.zeros(1, n, dtype=torch.long, device="meta")  # noqa: E731

    vlm = internvl3_8b()
    lm = vlm.model.language_model
    image_tokens = 256 * args.tiles
    caption_prompt = image_tokens + 100  # + prompt text and chat template
    refer_prefix = image_tokens + 30 + args.caption_tokens  # image, template, "Image description: {caption}"
    per_object = 70  # the object's part of the refer prompt (phrase, box, instruction), past the cached prefix
    with torch.no_grad():
        vision = gflops(lambda: vlm.model.get_image_features(torch.empty(args.tiles, 3, 448, 448, device="meta")))
        lm_at = {n: gflops(lambda n=n: lm(input_ids=meta_ids(n))) for n in
                 (caption_prompt, caption_prompt + 1, refer_prefix, refer_prefix + per_object, refer_prefix + per_object + 1)}
    decode_caption = lm_at[caption_prompt + 1] - lm_at[caption_prompt]
    decode_refer = lm_at[refer_prefix + per_object + 1] - lm_at[refer_prefix + per_object]
    print(f"InternVL3-8B ({params(vlm):.2f} B params), {args.tiles} tiles = {image_tokens} image tokens:")
    print(f"  vision encoder + projector: {vision:,.0f} GFLOP per image")
    print(f"  caption prefill, {caption_prompt} tokens: {lm_at[caption_prompt]:,.0f} GFLOP; decode {decode_caption:.1f} GFLOP per token")
    print(f"  refer prefix (image + caption), {refer_prefix} tokens: {lm_at[refer_prefix]:,.0f} GFLOP; per object "
          f"{per_object} more prompt tokens: {lm_at[refer_prefix + per_object] - lm_at[refer_prefix]:,.0f} GFLOP; "
          f"decode {decode_refer:.1f} GFLOP per token")

    florence = florence2_large()
    prompt = 10 + args.caption_tokens  # task prompt + caption (one chunk: under the 1024 - 577 budget)
    answer = 8 * args.objects  # per object: phrase (~3 tokens) + 4 <loc_> tokens + separator
    with torch.no_grad():
        image = florence.model.get_image_features(torch.empty(1, 3, 768, 768, device="meta")).pooler_output
        vision = gflops(lambda: florence.model.get_image_features(torch.empty(1, 3, 768, 768, device="meta")))
        text = florence.model.language_model  # the encoder reads the image tokens and the prompt together

        def forward(decoder_tokens):
            embeds = torch.empty(1, image.shape[1] + prompt, image.shape[-1], device="meta")
            return lambda: text(inputs_embeds=embeds, decoder_input_ids=meta_ids(decoder_tokens))

        one, full = gflops(forward(1)), gflops(forward(answer + 1))
    print(f"Florence-2-large ({params(florence):.2f} B params), 768 px, {prompt}-token prompt, {answer} answer tokens:")
    print(f"  vision encoder {vision:,.0f} GFLOP ({image.shape[1]} image tokens); text encoder + 1 decoder token {one:,.0f} GFLOP; "
          f"decoder {(full - one) / answer:.2f} GFLOP per token per beam")

    from sculpt.models import evf_sam2

    evf = evf_sam2.EvfSam2(evf_sam2.EvfConfig(), device="meta").eval()
    ids = torch.zeros(args.objects, 24, dtype=torch.long, device="meta")  # ~16 words -> ~24 XLM-R tokens
    # autograd stays on here: FlopCounterMode's module tracking needs it with these modules (meta: no compute)
    features = evf.image_features(torch.empty(1, 3, 1024, 1024, device="meta"))
    embedding = gflops(lambda: evf.image_features(torch.empty(1, 3, 1024, 1024, device="meta")))
    prompts = evf.prompts(torch.empty(1, 3, 224, 224, device="meta"), ids, torch.ones_like(ids))
    beit = gflops(lambda: evf.prompts(torch.empty(1, 3, 224, 224, device="meta"), ids, torch.ones_like(ids)))
    decoder = gflops(lambda: evf.decode(features, prompts))
    print(f"EVF-SAM2 ({params(evf):.2f} B params): SAM2 hiera-l image embedding (1024 px; the masker's SAM2.1-L runs the "
          f"same encoder) {embedding:,.0f} GFLOP; per expression: BEiT-3-L {beit / args.objects:,.0f} GFLOP + "
          f"SAM2 mask decoder {decoder / args.objects:.1f} GFLOP")


if __name__ == "__main__":
    main()
