"""Attention entry points of SAM.

The image encoder's attention with relative positions runs through the op
``fastzoo.ops.rel_pos_window_attention`` (called by ``image_encoder.Attention``: the fused
Triton kernel for fp16/bf16 CUDA tensors, its reference elsewhere — so CPU/fp32 results are
the reference's, which is what ``segment_anything`` computes); without them through
:func:`rel_pos_attention`, and the mask decoder's through :func:`plain_attention`.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from fastzoo import ops


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: Optional[torch.Tensor],
    rel_w: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Attention with SAM's decomposed relative-position bias.

    Args:
        q, k, v: ``(B, heads, N, head_dim)`` with ``N = H * W`` tokens of an ``H x W`` grid
            (row major).
        rel_h: ``(B, heads, N, H)``: for every query the bias towards each key *row*
            (``q · R_h``, computed from the unscaled query), or ``None``.
        rel_w: ``(B, heads, N, W)``: the bias towards each key *column*, or ``None``.
        scale: softmax scale applied to ``q @ k^T`` (not to the bias).

    Returns:
        ``(B, heads, N, head_dim)``.

    The bias of query ``i`` towards key ``(r, c)`` is ``rel_h[..., i, r] + rel_w[..., i, c]``.
    """
    if rel_h is None or rel_w is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return ops.rel_pos_attention(q, k, v, rel_h, rel_w, scale)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention on ``(B, heads, N, head_dim)`` tensors (scale 1/sqrt(head_dim))."""
    return F.scaled_dot_product_attention(q, k, v)
