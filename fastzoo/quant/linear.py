"""Quantized replacements for ``nn.Linear``.

Each holds its quantized weight and scales as buffers (so ``state_dict`` carries
them and ``load_state_dict(strict=True)`` restores them), is built from a float
``nn.Linear`` by ``from_linear`` (which also works on the meta device, for loading
quantized checkpoints without materialising float weights), and computes its
forward through ``fastzoo.ops`` where a kernel exists and in plain PyTorch where
it does not yet.
"""
from __future__ import annotations

import torch
from torch import nn

from fastzoo.ops import int4_weight_only_linear, int8_dynamic_linear, int8_weight_only_linear
from fastzoo.ops.quantize_rows import EPS as _EPS
from fastzoo.ops.quantize_rows import quantize_rows_int8_ref
from fastzoo.ops.weight_only_linear import INT4_GROUP_SIZES, int4_dequantize

def _check_float_weight(linear: nn.Linear) -> None:
    if not linear.weight.dtype.is_floating_point:
        raise TypeError(f"expected a float nn.Linear weight, found {linear.weight.dtype}")


def quantize_weight_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (int8 weight, float32 scales of shape (out,))."""
    q, scales = quantize_rows_int8_ref(w.detach())  # each output channel is a row
    return q, scales.squeeze(-1)


class Int8WeightOnlyLinear(nn.Module):
    """y = x · (W_int8 · s)ᵀ + b with per-output-channel scales; activations stay in float."""

    scales_in_fp32 = False  # weight-only keeps scales in the model's dtype (bf16 epilogue)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        scales_dtype = torch.float32 if self.scales_in_fp32 else dtype
        self.register_buffer("scales", torch.ones(out_features, dtype=scales_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        _check_float_weight(linear)
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype)
        q, s = quantize_weight_int8_per_channel(w)
        m.weight = q
        m.scales = s if cls.scales_in_fp32 else s.to(w.dtype)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_weight_only_linear(x, self.weight, self.scales.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8DynamicLinear(Int8WeightOnlyLinear):
    """int8 weights (per channel) × int8 activations quantized per token at run time.

    The forward is ``fastzoo.ops.int8_dynamic_linear``: per-token ``quantize_rows_int8``,
    then ``int8_scaled_mm`` (exact int32 product, both scales and the bias fused in the
    epilogue; a Triton kernel on CUDA, the PyTorch reference elsewhere).
    """

    scales_in_fp32 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # scales stay float32 even if the module was cast with .to(dtype)
        return int8_dynamic_linear(x, self.weight, self.scales.float(), self.bias)


class Int4WeightOnlyLinear(nn.Module):
    """Asymmetric group-wise int4 weights, two per byte; activations stay in float.

    For each group of ``group_size`` input columns of an output row:
    ``w ≈ q · scale + zero`` with q in [0, 15], ``zero`` the group minimum and
    ``scale = (max − min) / 15``. Buffers: ``weight`` uint8 (out, in/2) — column 2j in
    the low nibble, 2j+1 in the high nibble — and ``scales``, ``zeros`` (out, in/group_size).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        if in_features % group_size:
            raise ValueError(f"int4 with group_size={group_size} needs in_features divisible by it, "
                             f"found in_features={in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @staticmethod
    def quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float (out, in) → (packed uint8 (out, in/2), scales, zeros), both (out, in/group_size) float32."""
        out_f, in_f = w.shape
        g = w.detach().to(torch.float32).reshape(out_f, in_f // group_size, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scales = torch.clamp(hi - lo, min=_EPS) / 15.0
        q = torch.round((g - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.uint8)
        q = q.reshape(out_f, in_f)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        return packed, scales, lo

    @staticmethod
    def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
        return int4_dequantize(packed, scales, zeros, group_size, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "Int4WeightOnlyLinear":
        _check_float_weight(linear)
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                device=w.device, dtype=w.dtype)
        packed, scales, zeros = cls.quantize(w, group_size)
        m.weight, m.scales, m.zeros = packed, scales.to(w.dtype), zeros.to(w.dtype)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_weight_only_linear(x, self.weight, self.scales.to(x.dtype), self.zeros.to(x.dtype),
                                       self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")
