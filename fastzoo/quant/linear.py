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

from fastzoo.ops import int4_weight_only_linear, int8_dynamic_linear, int8_scaled_mm, int8_weight_only_linear
from fastzoo.ops.int8_mm import requantize_int8_ref
from fastzoo.ops.quantize_rows import EPS as _EPS
from fastzoo.ops.quantize_rows import quantize_rows_int8_ref
from fastzoo.ops.weight_only_linear import INT4_GROUP_SIZES, int4_dequantize, norm_options

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

    def fused_forward(self, x: torch.Tensor, *, norm=None, glu: bool = False,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
        """``fastzoo.llama.model.fused_linear``'s protocol: RMSNorm (``norm``), SwiGLU and
        residual fused into the int8 weight-only kernel."""
        return int8_weight_only_linear(x, self.weight, self.scales.to(x.dtype), self.bias, glu=glu,
                                       residual=residual, **norm_options(norm))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8DynamicLinear(Int8WeightOnlyLinear):
    """int8 weights (per channel) × int8 activations quantized per token at run time.

    The forward is ``fastzoo.ops.int8_dynamic_linear``: per-token ``quantize_rows_int8``,
    then ``int8_scaled_mm`` (exact int32 product, both scales and the bias fused in the
    epilogue; a Triton kernel on CUDA, the PyTorch reference elsewhere).
    """

    scales_in_fp32 = True
    fused_forward = None  # not the weight-only product: fused_linear composes around forward
    fuses_residual = True  # forward(x, residual=r) adds r in the GEMM's epilogue

    def forward(self, x: torch.Tensor, *, activation: str = "none",
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """``activation`` ("none"/"gelu") and ``residual`` are fused in the GEMM's epilogue."""
        # scales stay float32 even if the module was cast with .to(dtype)
        return int8_dynamic_linear(x, self.weight, self.scales.float(), self.bias, activation=activation,
                                   residual=residual)


def quantize_weight_int8(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weight: per output channel (scales (out,)) or per tensor (scale (1,))."""
    if per_channel:
        return quantize_weight_int8_per_channel(w)
    scale = (torch.clamp(w.detach().float().abs().amax(), min=_EPS) / 127.0).reshape(1)
    return requantize_int8_ref(w.detach(), scale), scale


class Int8StaticLinear(nn.Module):
    """int8 weights × int8 activations quantized with a calibrated static scale (W8A8 static).

    Buffers: ``weight`` int8 (out, in), ``scales`` float32 (out,) per channel or (1,) per
    tensor, ``in_scale`` float32 (1,) (the input's calibrated scale), and, when the output is
    int8, ``out_scale`` of ``out_scale_size`` entries: 1 (per tensor: the next layer's input
    scale) or ``out`` (per output channel: the fused ViT blocks' q / k / v segments of qkv);
    ``out_scale_size=0``: float output, no ``out_scale``. ``forward(x)``: a float x is quantized with ``in_scale``
    (``clamp(round(x / in_scale))``, fused by torch.compile into one pass), an int8 x is
    taken as already quantized with it; then ``int8_scaled_mm`` with the scales, bias (and
    ``activation``/``residual`` when given) in its epilogue. Output: ``out_dtype`` (the
    bias's dtype by default), int8 when ``out_scale`` is set.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, per_channel: bool = True,
                 out_scale_size: int = 0, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if out_scale_size not in (0, 1, out_features):
            raise ValueError(f"out_scale_size must be 0 (float output), 1 (per tensor) or out_features="
                             f"{out_features} (per channel), got {out_scale_size}")
        self.in_features, self.out_features, self.per_channel = in_features, out_features, per_channel
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features if per_channel else 1, dtype=torch.float32,
                                                  device=device))
        self.register_buffer("in_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.out_scale: torch.Tensor | None
        if out_scale_size:
            self.register_buffer("out_scale", torch.ones(out_scale_size, dtype=torch.float32, device=device))
        else:
            self.out_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_scale: torch.Tensor, per_channel: bool = True,
                    out_scale: torch.Tensor | None = None) -> "Int8StaticLinear":
        _check_float_weight(linear)
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, per_channel,
                0 if out_scale is None else out_scale.numel(), device=w.device, dtype=w.dtype)
        m.weight, m.scales = quantize_weight_int8(w, per_channel)
        m.in_scale = in_scale.detach().float().reshape(1).to(w.device)
        if out_scale is not None:
            m.out_scale = out_scale.detach().float().reshape(-1).to(w.device)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    fuses_residual = True  # forward(x, residual=r) adds r in the GEMM's epilogue

    def forward(self, x: torch.Tensor, *, activation: str = "none", residual: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, out_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``out_scale``: int8 output with this scale (e.g. the next layer's ``in_scale``), for
        a module without its own ``out_scale``."""
        K = x.shape[-1]
        in_scale = self.in_scale.float()  # fp32 for the kernel, also after ``.to(dtype)`` cast the buffers
        if out_scale is not None and self.out_scale is not None:
            raise ValueError("out_scale given to an Int8StaticLinear that has its own out_scale buffer")
        out_scale = self.out_scale if out_scale is None else out_scale
        out_scale = None if out_scale is None else out_scale.float()
        if x.dtype != torch.int8:
            out_dtype = out_dtype or x.dtype
            x = requantize_int8_ref(x, in_scale)
        if out_scale is not None:
            out_dtype = torch.int8
        elif out_dtype is None:
            out_dtype = self.bias.dtype if self.bias is not None else torch.bfloat16
        res = None if residual is None else residual.reshape(-1, self.out_features)
        out = int8_scaled_mm(x.reshape(-1, K), self.weight, in_scale, self.scales.float(), self.bias, out_dtype,
                             activation=activation, residual=res, out_scale=out_scale)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"per_channel={self.per_channel}, int8_out={self.out_scale is not None}")


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

    def fuses(self, x: torch.Tensor, norm=None) -> bool:
        """Whether ``fused_forward`` runs the options inside one kernel for ``x`` (one row on
        a Hopper GPU: ``fastzoo.ops.int4_gemv_gluon``; a norm weight in x's dtype);
        elsewhere ``fastzoo.llama.model.fused_linear`` composes them around ``forward``,
        where ``torch.compile`` fuses them."""
        from fastzoo.ops.int4_gemv_gluon import int4_fusion_applies

        return (int4_fusion_applies(x, self.in_features, self.group_size)
                and (norm is None or norm.weight.dtype == x.dtype))

    def fused_forward(self, x: torch.Tensor, *, norm=None, glu: bool = False,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
        """``fastzoo.llama.model.fused_linear``'s protocol: RMSNorm (``norm``), SwiGLU and
        residual fused into the int4 weight-only kernel (where ``fuses``)."""
        return int4_weight_only_linear(x, self.weight, self.scales.to(x.dtype), self.zeros.to(x.dtype),
                                       self.group_size, self.bias, glu=glu, residual=residual, **norm_options(norm))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")
