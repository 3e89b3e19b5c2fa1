"""Vision Transformer (ViT) in plain PyTorch, with timm's architecture and state-dict keys.

Class token, learned position embeddings (class token included), pre-norm blocks
(LayerNorm eps 1e-6, fused ``qkv`` projection, GELU MLP), final norm, linear head on the
class token. Attention goes through ``F.scaled_dot_product_attention``. A state dict of
timm's ViTs named in ``fastzoo.vit.VIT_CONFIGS`` loads with ``strict=True``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    in_chans: int = 3
    norm_eps: float = 1e-6

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2 + 1


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Patches → tokens. The weights are timm's ``Conv2d`` (kernel = stride = patch, same
    state-dict keys); the forward is that convolution written as what it is, one matmul of
    the image's non-overlapping patches (B·N, C·p·p) with the weight as (D, C·p·p): the
    same sums, and a tensor-core GEMM on every device. (cuDNN's own choice for the 3-channel
    bf16 convolution was a non-tensor-core kernel, 5.4 ms of ViT-L/16's 97 ms in int8 at batch
    512 on an H100; as a matmul, fastzoo bf16 went 138.1 -> 132.3 ms: experiments/results/
    h100-80gb-hbm3/vit_epilogue_patch_embed_ab.json.)"""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.proj.stride[0]  # = the kernel size
        B, C, H, W = x.shape
        if H % p or W % p:  # the convolution's floor: pixels past the last whole patch are not read
            H, W = H // p * p, W // p * p
            x = x[..., :H, :W]
        patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), -1)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_tokens, cfg.embed_dim) * 0.02)
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) at the model's resolution → normalised tokens (B, 1 + N, D)."""
        size = self.config.img_size
        if x.dim() != 4 or x.shape[1] != self.config.in_chans or x.shape[-2:] != (size, size):
            raise ValueError(f"expected images of shape (B, {self.config.in_chans}, {size}, {size}), "
                             f"got {tuple(x.shape)}")
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
