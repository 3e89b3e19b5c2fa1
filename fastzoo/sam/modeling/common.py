"""Small building blocks shared by the SAM modules."""
from typing import Type

import torch
from torch import nn

from fastzoo import ops


class MLPBlock(nn.Module):
    """Two linear layers with an activation between them (``lin1``/``lin2`` as in the checkpoints).

    ``fused_mlp`` (not part of the state dict; off by default, ``build_sam_fast(kernel="fused")``
    turns it on for the image encoder after any quantization): float linears around an exact
    GELU run through ``fastzoo.ops.linear_act``, unless one of the three modules has forward
    hooks (calibration observers, GPTQ's collectors): then they are called as modules."""

    fused_mlp = False

    def __init__(self, embedding_dim: int, mlp_dim: int, act: Type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``lin2(act(lin1(x)))``, plus ``residual`` when given (a quantized MLP fuses the add
        into lin2's GEMM). Float linears around an exact GELU go through
        ``fastzoo.ops.linear_act`` (the same F.linear, F.gelu and add where its kernel does not
        apply; on Hopper the GELU and the residual in the GEMMs' epilogues)."""
        if (self.fused_mlp and type(self.lin1) is nn.Linear and type(self.lin2) is nn.Linear
                and type(self.act) is nn.GELU and self.act.approximate == "none"
                and not any(m._forward_hooks or m._forward_pre_hooks for m in (self.lin1, self.act, self.lin2))):
            h = ops.linear_act(x, self.lin1.weight, self.lin1.bias, activation="gelu")
            return ops.linear_act(h, self.lin2.weight, self.lin2.bias, residual=residual)
        y = self.lin2(self.act(self.lin1(x)))
        return y if residual is None else residual + y


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a ``(B, C, H, W)`` tensor.

    Statistics are computed in float32 whatever the input dtype (a no-op in fp32).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        mean = xf.mean(1, keepdim=True)
        var = (xf - mean).pow(2).mean(1, keepdim=True)
        xf = (xf - mean) / torch.sqrt(var + self.eps)
        xf = self.weight.float()[:, None, None] * xf + self.bias.float()[:, None, None]
        return xf.to(dtype)
