"""Attention entry points of SAM.

Every attention of the image encoder goes through :func:`rel_pos_attention`, and every
attention of the mask decoder through :func:`attention`.  These are the single places a
fused kernel replaces later; the versions here are the plain-PyTorch reference.
"""
from typing import Optional

import torch
import torch.nn.functional as F


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
    B, nh, N, _ = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, N, kh * kw)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention on ``(B, heads, N, head_dim)`` tensors (scale 1/sqrt(head_dim))."""
    return F.scaled_dot_product_attention(q, k, v)
