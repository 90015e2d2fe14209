"""BEiT-3 as torchscale builds it (multiway encoder, subln, pre-norm, GELU): EVF-SAM2's multimodal extractor.

Way A for the image tokens, way B for the text tokens, one attention over both; parameter names follow
torchscale's so that EVF-SAM2's checkpoints (``mm_extractor.beit3.*``) load strictly (``sculpt.models.evf_sam2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Beit3Config:
    embed_dim: int = 1024
    layers: int = 24
    heads: int = 16
    ffn_dim: int = 4096
    vocab_size: int = 64010
    img_size: int = 224
    patch_size: int = 16
    max_text_positions: int = 1024
    layernorm_eps: float = 1e-5


BEIT3_SCALES = {"base": Beit3Config(768, 12, 12, 3072), "large": Beit3Config()}


# ---------------------------------------------------------------- BEiT-3 (torchscale's BEiT3, multiway encoder)


class Multiway(nn.Module):
    """Two copies of a module: A for the first ``split`` tokens (the image), B for the rest (the text)."""

    def __init__(self, make):
        super().__init__()
        self.A, self.B = make(), make()

    def forward(self, x, split):
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)


class SelfAttention(nn.Module):
    def __init__(self, c: Beit3Config):
        super().__init__()
        self.heads = c.heads
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            setattr(self, name, Multiway(lambda: nn.Linear(c.embed_dim, c.embed_dim)))
        self.inner_attn_ln = Multiway(lambda: nn.LayerNorm(c.embed_dim, eps=c.layernorm_eps))

    def forward(self, x, split, keep):
        b, s, d = x.shape
        q, k, v = (p(x, split).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return self.out_proj(self.inner_attn_ln(y.transpose(1, 2).reshape(b, s, d), split), split)


class FeedForward(nn.Module):
    def __init__(self, c: Beit3Config):
        super().__init__()
        self.fc1 = nn.Linear(c.embed_dim, c.ffn_dim)
        self.fc2 = nn.Linear(c.ffn_dim, c.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(c.ffn_dim, eps=c.layernorm_eps)

    def forward(self, x):
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x).float()).type_as(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: Beit3Config):
        super().__init__()
        norm = lambda: nn.LayerNorm(c.embed_dim, eps=c.layernorm_eps)  # noqa: E731
        self.self_attn = SelfAttention(c)
        self.self_attn_layer_norm = Multiway(norm)
        self.ffn = Multiway(lambda: FeedForward(c))
        self.final_layer_norm = Multiway(norm)

    def forward(self, x, split, keep):
        x = x + self.self_attn(self.self_attn_layer_norm(x, split), split, keep)
        return x + self.ffn(self.final_layer_norm(x, split), split)


class Positions(nn.Module):
    """Learned positions per way; like fairseq, both tables start at row 2."""

    def __init__(self, image_tokens: int, c: Beit3Config):
        super().__init__()
        self.A = nn.Embedding(image_tokens + 2, c.embed_dim)
        self.B = nn.Embedding(c.max_text_positions, c.embed_dim)

    def forward(self, image_tokens: int, text_tokens: int):
        return torch.cat([self.A.weight[2 : 2 + image_tokens], self.B.weight[2 : 2 + text_tokens]])


class Encoder(nn.Module):
    def __init__(self, image_tokens: int, c: Beit3Config):
        super().__init__()
        self.embed_positions = Positions(image_tokens, c)
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.layers))
        self.layer_norm = Multiway(lambda: nn.LayerNorm(c.embed_dim, eps=c.layernorm_eps))

    def forward(self, x, split, keep):
        x = (x + self.embed_positions(split, x.shape[1] - split)) * keep[..., None]  # padded tokens zeroed
        for layer in self.layers:
            x = layer(x, split, keep)
        return self.layer_norm(x, split)


class VisionEmbedding(nn.Module):
    def __init__(self, c: Beit3Config):
        super().__init__()
        self.proj = nn.Conv2d(3, c.embed_dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))  # masked image modelling; unused here
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.tokens = (c.img_size // c.patch_size) ** 2 + 1

    def forward(self, images):
        patches = self.proj(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(len(images), -1, -1), patches], dim=1)


class Beit3(nn.Module):
    def __init__(self, c: Beit3Config):
        super().__init__()
        self.config = c
        self.text_embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.vision_embed = VisionEmbedding(c)
        self.encoder = Encoder(self.vision_embed.tokens, c)

    def forward(self, images, input_ids, attention_mask):
        """Hidden states of [image CLS, image patches, text tokens]; attention_mask is 0 on padded text."""
        image = self.vision_embed(images)
        split = image.shape[1]
        keep = torch.cat([torch.ones(image.shape[:2], dtype=torch.bool, device=image.device), attention_mask.bool()], 1)
        return self.encoder(torch.cat([image, self.text_embed(input_ids)], dim=1), split, keep)


# ---------------------------------------------------------------- EVF-SAM2
