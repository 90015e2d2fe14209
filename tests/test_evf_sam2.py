"""EVF-SAM2: official key layout, strict loading, tokenizer, pre/post-processing, BEiT-3 against torchscale.

Runs without sam2 for the BEiT-3 tests (e.g. in a torchscale venv: see test_beit3_matches_torchscale).
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from sculpt.models import evf_sam2
from sculpt.models.evf_sam2 import Beit3, Beit3Config

TINY_BEIT3 = Beit3Config(embed_dim=32, layers=2, heads=4, ffn_dim=64, vocab_size=100, img_size=32, patch_size=8, max_text_positions=40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("sam2")
    from sculpt.testing import tiny_evf_sam2

    return tiny_evf_sam2.write(str(tmp_path_factory.mktemp("evf") / "evf-sam2-tiny"))


@pytest.fixture(scope="module")
def predictor(tiny):
    return evf_sam2.load(tiny)


def checkpoint_tensors(directory):
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "model.safetensors"))


def image(height=120, width=160, seed=0):
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


def randomized(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.3)
    return module.eval()


# ---------------------------------------------------------------- checkpoint layout and strict loading


def test_tiny_checkpoint_is_in_the_official_layout_and_loads_strictly(tiny, predictor):
    assert sorted(os.listdir(tiny)) == ["config.json", "model.safetensors", "sentencepiece.bpe.model", "tokenizer_config.json"]
    config = json.load(open(os.path.join(tiny, "config.json")))
    assert config["model_type"] == "evf" and config["architectures"] == ["EvfSam2Model"]
    tensors = checkpoint_tensors(tiny)
    assert {k.split(".")[0] for k in tensors} == {"visual_model", "mm_extractor", "text_hidden_fcs"}
    assert {k for k in tensors if k.startswith("text_hidden_fcs")} == {f"text_hidden_fcs.0.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert all(k.startswith("mm_extractor.beit3.") for k in tensors if k.startswith("mm_extractor"))
    # The reference renamed SAM2's CXBlock.gamma to .weight; the checkpoint carries that name.
    assert "visual_model.memory_encoder.fuser.layers.0.weight" in tensors and not any("gamma" in k for k in tensors)
    loaded = predictor.model.state_dict()
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_the_writer_is_reproducible_per_seed(tiny, tmp_path):
    from sculpt.testing import tiny_evf_sam2

    first = checkpoint_tensors(tiny)
    again = checkpoint_tensors(tiny_evf_sam2.write(str(tmp_path / "again"), seed=0))
    other = checkpoint_tensors(tiny_evf_sam2.write(str(tmp_path / "other"), seed=1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["text_hidden_fcs.0.0.weight"], other["text_hidden_fcs.0.0.weight"])
    assert open(os.path.join(tiny, evf_sam2.TOKENIZER_FILE), "rb").read() == open(tmp_path / "again" / evf_sam2.TOKENIZER_FILE, "rb").read()


def test_missing_and_unexpected_keys_are_named(tiny, tmp_path):
    from safetensors.torch import save_file

    tensors = checkpoint_tensors(tiny)
    del tensors["text_hidden_fcs.0.2.bias"]
    tensors["mm_extractor.beit3.surplus"] = torch.zeros(1)
    broken = shutil.copytree(tiny, tmp_path / "broken")
    save_file(tensors, os.path.join(broken, "model.safetensors"))
    with pytest.raises(evf_sam2.CheckpointMismatch) as err:
        evf_sam2.load(str(broken))
    assert "missing keys 1 ['text_hidden_fcs.0.2.bias']" in str(err.value)
    assert "unexpected keys 1 ['mm_extractor.beit3.surplus']" in str(err.value)


def test_pickle_and_sharded_checkpoints_load_the_same_weights(tiny, predictor, tmp_path):
    from huggingface_hub import save_torch_state_dict

    tensors = checkpoint_tensors(tiny)
    for name in ("bin", "sharded"):
        directory = shutil.copytree(tiny, tmp_path / name)
        os.remove(os.path.join(directory, "model.safetensors"))
        if name == "bin":
            torch.save(tensors, os.path.join(directory, "pytorch_model.bin"))
        else:
            save_torch_state_dict(tensors, directory, max_shard_size="1MB")
            assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
        state = evf_sam2.load(str(directory)).model.state_dict()
        assert all(torch.equal(state[k], tensors[k]) for k in tensors)


def test_large_configuration_key_layout():
    """The key prefixes and shapes of YxZhang/evf-sam2, taken from the reference module tree: SAM2 2.0 hiera-l
    from the reference's bundled sam2 (900 tensors, 224.4 M), BEiT-3 large from torchscale (971, 672.7 M);
    898 M in all, the README's figure."""
    pytest.importorskip("sam2")
    model = evf_sam2.EvfSam2(evf_sam2.EvfConfig(), device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    def part(prefix):
        return {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}

    sam2, beit3, fcs = part("visual_model."), part("mm_extractor.beit3."), part("text_hidden_fcs.")
    assert len(shapes) == len(sam2) + len(beit3) + len(fcs)
    numel = lambda d: sum(int(np.prod(s)) for s in d.values())  # noqa: E731
    assert (len(sam2), numel(sam2)) == (900, 224_430_386)
    assert (len(beit3), numel(beit3)) == (971, 672_702_464)
    assert fcs == {"0.0.weight": (1024, 1024), "0.0.bias": (1024,), "0.2.weight": (256, 1024), "0.2.bias": (256,)}

    assert {k.split(".")[0] for k in sam2} == {
        "image_encoder", "mask_downsample", "maskmem_tpos_enc", "memory_attention", "memory_encoder",
        "no_mem_embed", "no_mem_pos_enc", "no_obj_ptr", "obj_ptr_proj", "sam_mask_decoder", "sam_prompt_encoder",
    }
    assert {k: sam2[k] for k in [
        "image_encoder.trunk.pos_embed", "image_encoder.trunk.patch_embed.proj.weight", "image_encoder.neck.convs.0.conv.weight",
        "sam_prompt_encoder.no_mask_embed.weight", "sam_mask_decoder.conv_s0.weight", "sam_mask_decoder.mask_tokens.weight",
        "no_mem_embed", "memory_encoder.fuser.layers.1.weight",
    ]} == {
        "image_encoder.trunk.pos_embed": (1, 144, 7, 7), "image_encoder.trunk.patch_embed.proj.weight": (144, 3, 7, 7),
        "image_encoder.neck.convs.0.conv.weight": (256, 1152, 1, 1), "sam_prompt_encoder.no_mask_embed.weight": (1, 256),
        "sam_mask_decoder.conv_s0.weight": (32, 256, 1, 1), "sam_mask_decoder.mask_tokens.weight": (4, 256),
        "no_mem_embed": (1, 1, 256), "memory_encoder.fuser.layers.1.weight": (256,),
    }
    assert not any("gamma" in k for k in sam2)

    d, f = 1024, 4096
    layer = {}
    for way in "AB":
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            layer |= {f"self_attn.{proj}.{way}.weight": (d, d), f"self_attn.{proj}.{way}.bias": (d,)}
        for norm in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
            layer |= {f"{norm}.{way}.weight": (d,), f"{norm}.{way}.bias": (d,)}
        layer |= {f"ffn.{way}.fc1.weight": (f, d), f"ffn.{way}.fc1.bias": (f,), f"ffn.{way}.fc2.weight": (d, f),
                  f"ffn.{way}.fc2.bias": (d,), f"ffn.{way}.ffn_layernorm.weight": (f,), f"ffn.{way}.ffn_layernorm.bias": (f,)}
    expected = {f"encoder.layers.{i}.{k}": s for i in range(24) for k, s in layer.items()} | {
        "text_embed.weight": (64010, d), "vision_embed.mask_token": (1, 1, d), "vision_embed.cls_token": (1, 1, d),
        "vision_embed.proj.weight": (d, 3, 16, 16), "vision_embed.proj.bias": (d,),
        "encoder.embed_positions.A.weight": (199, d), "encoder.embed_positions.B.weight": (1024, d),
        "encoder.layer_norm.A.weight": (d,), "encoder.layer_norm.A.bias": (d,),
        "encoder.layer_norm.B.weight": (d,), "encoder.layer_norm.B.bias": (d,),
    }
    assert beit3 == expected


# ---------------------------------------------------------------- BEiT-3


def test_beit3_matches_torchscale():
    """Our BEiT-3 against torchscale's on identical random weights (the state dict loads strictly both ways).

    Skips without torchscale; to run it: python -m venv /tmp/venv-ts && /tmp/venv-ts/bin/pip install torch==2.13.0
    numpy pillow pytest && /tmp/venv-ts/bin/pip install --no-deps torchscale==0.2.0 fairscale==0.4.0 timm==0.6.13
    torchvision (PyPI torchvision also needs .ci/cpu_shims.py), then
    PYTHONPATH=. /tmp/venv-ts/bin/python -m pytest tests/test_evf_sam2.py -k beit3
    """
    BEiT3 = pytest.importorskip("torchscale.model.BEiT3").BEiT3
    from torchscale.architecture.config import EncoderConfig

    c = TINY_BEIT3
    reference = randomized(BEiT3(EncoderConfig(
        img_size=c.img_size, patch_size=c.patch_size, vocab_size=c.vocab_size, multiway=True, layernorm_embedding=False,
        normalize_output=True, no_output_layer=True, encoder_embed_dim=c.embed_dim, encoder_attention_heads=c.heads,
        encoder_ffn_embed_dim=c.ffn_dim, encoder_layers=c.layers, max_source_positions=c.max_text_positions,
    )))
    ours = Beit3(c).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    torch.manual_seed(1)
    images = torch.randn(3, 3, c.img_size, c.img_size)
    ids = torch.randint(4, c.vocab_size, (3, 9))
    attention = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    with torch.no_grad():
        expected = reference(textual_tokens=ids, visual_tokens=images, text_padding_position=attention == 0)["encoder_out"]
        got = ours(images, ids, attention)
    assert got.shape == (3, 17 + 9, c.embed_dim)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_padding_does_not_change_an_expressions_output():
    model = randomized(Beit3(TINY_BEIT3))
    images = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    ids = torch.tensor([[0, 11, 12, 2, 1, 1, 1], [0, 21, 22, 23, 24, 25, 2]])
    mask = (ids != 1).long()
    with torch.no_grad():
        batched = model(images, ids, mask)
        alone = model(images[:1], ids[:1, :4], mask[:1, :4])
        changed = model(images[:1], torch.tensor([[0, 11, 13, 2]]), torch.ones(1, 4, dtype=torch.long))
    torch.testing.assert_close(batched[:1, : 17 + 4], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed[:, 0], alone[:, 0], atol=1e-3)  # the CLS output does depend on the text


# ---------------------------------------------------------------- tokenizer, pre- and post-processing


def test_tokenizer_is_xlmr_on_the_sentencepiece_model(tiny):
    import sentencepiece

    tokenizer = evf_sam2.load_tokenizer(tiny)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tiny, evf_sam2.TOKENIZER_FILE))
    for text in ["the dog on the left", "[semantic] hair", "Qx unseen WORDS, here!"]:
        fairseq = [piece + 1 if piece else 3 for piece in sp.encode(text)]  # <unk> is 3, pieces shift by one
        assert tokenizer(text)["input_ids"] == [0, *fairseq, 2]
    batch = tokenizer(["a dog", "the tallest tree behind"], padding=True)
    assert batch["input_ids"][0][-1] == 1 and batch["attention_mask"][0][-1] == 0  # <pad> = 1, on the right


def test_a_sentencepiece_model_the_conversion_gets_wrong_is_refused(tiny, tmp_path):
    import io

    import sentencepiece

    from sculpt.testing import tiny_evf_sam2

    buffer = io.BytesIO()  # BPE: transformers' XLMRobertaTokenizer would read it as unigram and tokenize differently
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(tiny_evf_sam2.CORPUS), model_writer=buffer,
                                             model_type="bpe", vocab_size=120, num_threads=1, minloglevel=2)
    directory = shutil.copytree(tiny, tmp_path / "bpe")
    with open(os.path.join(directory, evf_sam2.TOKENIZER_FILE), "wb") as f:
        f.write(buffer.getvalue())
    with pytest.raises(ValueError, match="disagrees with sentencepiece"):
        evf_sam2.load_tokenizer(str(directory))


def test_beit3_input_matches_the_reference_torchvision_pipeline():
    transforms = pytest.importorskip("torchvision.transforms")
    for shape in [(50, 70), (500, 700)]:  # up- and down-scaling (no antialias, as the reference)
        img = image(*shape)
        reference = transforms.Compose([
            transforms.ToTensor(),
            transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC, antialias=None),
            transforms.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        ])(img)
        torch.testing.assert_close(evf_sam2.beit3_input(img)[0], reference, atol=1e-6, rtol=0)


def test_sam2_input_squashes_without_padding_and_normalises():
    img = np.zeros((10, 40, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 255, 128, 0
    x = evf_sam2.sam2_input(img, size=64)
    assert x.shape == (1, 3, 64, 64)
    expected = (torch.tensor([255.0, 128.0, 0.0]) - torch.tensor(evf_sam2.SAM_MEAN)) / torch.tensor(evf_sam2.SAM_STD)
    torch.testing.assert_close(x[0], expected.view(3, 1, 1).expand(3, 64, 64))  # every pixel: no padded border


def test_sam2_input_resizes_as_floats_within_a_level_of_the_references_uint8_resize(monkeypatch):
    import torch.nn.functional as F

    img = np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    reference = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], (256, 256), mode="bilinear",
                              align_corners=False).float()  # the reference's uint8 resize, which only the CPU has
    real = F.interpolate

    def cuda_like(x, *args, **kwargs):  # CUDA's bilinear and bicubic kernels take floating point only
        assert x.is_floating_point(), f"interpolate of {x.dtype}: not implemented on CUDA"
        return real(x, *args, **kwargs)

    monkeypatch.setattr(F, "interpolate", cuda_like)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (evf_sam2.SAM_MEAN, evf_sam2.SAM_STD))
    levels = evf_sam2.sam2_input(img, size=256) * std + mean
    assert (levels - reference).abs().max() <= 1.0 + 1e-3
    assert evf_sam2.beit3_input(img).shape == (1, 3, 224, 224)  # the other input is resized as floats too


def test_upsample_to_the_original_size():
    logits = -torch.ones(2, 4, 4)
    logits[0, :, :2] = 1  # left half
    masks = evf_sam2.upsample(logits, 6, 10)
    assert masks.shape == (2, 6, 10) and masks.dtype == bool
    assert masks[0, :, :5].all() and not masks[0, :, 5:].any() and not masks[1].any()


def test_default_prefix():
    assert evf_sam2.default_prefix("YxZhang/evf-sam2-multitask") == "[semantic] "
    assert evf_sam2.default_prefix("/ckpt/evf-sam2-multitask/") == "[semantic] "
    assert evf_sam2.default_prefix("YxZhang/evf-sam2") == ""


# ---------------------------------------------------------------- the predictor


def test_predictions_batch_reuse_and_prefix(predictor):
    img = image()
    expressions = ["the dog", "a man in a blue shirt holding a white cup near the window"]
    masks = predictor.predict(img, expressions)
    assert masks.shape == (2, 120, 160) and masks.dtype == bool
    np.testing.assert_array_equal(predictor.predict(img, expressions[:1]), masks[:1])  # no padding in a batch of one
    np.testing.assert_array_equal(predictor.predict(img, expressions, features=predictor.image_features(img)), masks)
    assert predictor.predict(img, []).shape == (0, 120, 160)
    prefixed = predictor.predict(img, ["[semantic] the dog"])
    assert not np.array_equal(prefixed[0], masks[0])  # the text reaches the mask
    predictor.prefix = "[semantic] "
    try:
        np.testing.assert_array_equal(predictor.predict(img, ["the dog"]), prefixed)
    finally:
        predictor.prefix = ""


def test_same_image_features_compares_the_encoder_weights(predictor):
    import copy

    sam = copy.deepcopy(predictor.model.visual_model)
    assert evf_sam2.same_image_features(predictor.model, sam.state_dict())
    with torch.no_grad():
        sam.sam_mask_decoder.iou_token.weight.add_(1)  # not behind the image features
    assert evf_sam2.same_image_features(predictor.model, sam.state_dict())
    with torch.no_grad():
        sam.image_encoder.neck.convs[0].conv.bias.add_(1e-3)
    assert not evf_sam2.same_image_features(predictor.model, sam.state_dict())


class FixedDecoder(torch.nn.Module):
    def __init__(self, logits, scores):
        super().__init__()
        self.out, self.asked = (logits, scores, None, None), {}

    def forward(self, **asked):
        self.asked = asked
        return self.out


def test_decode_takes_sam2s_single_mask_as_evf_sam_does(predictor, monkeypatch):
    model = predictor.model
    logits = torch.tensor([5.0, -5.0]).view(2, 1, 1, 1).expand(2, 1, 4, 4).clone()
    decoder = FixedDecoder(logits, torch.ones(2, 1))
    monkeypatch.setattr(model.visual_model, "sam_mask_decoder", decoder)
    features = {"image_embed": None, "high_res_feats": None}
    masks = model.decode(features, torch.zeros(2, 1, model.config.out_dim))
    assert decoder.asked["multimask_output"] is False  # hustvl's EvfSam2Model, in training and inference
    assert masks.shape == (2, 4, 4) and masks[:, 0, 0].tolist() == [5.0, -5.0]
