"""2:4 (semi-structured) sparsity for ``nn.Linear``: magnitude pruning and sparse modules.

Pruning: in every group of 4 consecutive weights along the input dimension (K) keep the
2 of largest magnitude and zero the other 2 (``prune_2_4``).

State-dict story. Both modules keep exactly the keys and shapes of the module they replace
(``Sparse24Linear``: ``weight`` float (out, in) + ``bias``, as ``nn.Linear``;
``Int8DynamicSparse24Linear``: ``weight`` int8 + ``scales`` + ``bias``, as
``Int8DynamicLinear``), holding the *pruned* weight in plain dense form. So a sparse model's
state dict loads strictly into a dense model (giving the pruned model), and loading any
state dict into a sparse module prunes it again, so the 2:4 pattern always holds. The
compressed semi-structured weight the GPU multiplies with is *derived* — never saved —
and rebuilt after every ``.to()``/``.cuda()``/``load_state_dict`` (``repack``) where it
qualifies (see ``semi_structured_reason``); elsewhere (CPU, fp32, odd shapes) the forward
multiplies with the pruned dense weight: the same math.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastzoo.ops import quantize_rows_int8

from .linear import Int8DynamicLinear, _check_float_weight


def mask_2_4(w: torch.Tensor) -> torch.Tensor:
    """Boolean mask of ``w`` (…, K), K divisible by 4: True for the 2 largest |w| of each group of 4."""
    if w.shape[-1] % 4:
        raise ValueError(f"2:4 sparsity needs the input dimension divisible by 4, found {w.shape[-1]}")
    g = w.detach().reshape(*w.shape[:-1], w.shape[-1] // 4, 4)
    keep = g.float().abs().topk(2, dim=-1).indices
    return torch.zeros(g.shape, dtype=torch.bool, device=w.device).scatter_(-1, keep, True).reshape(w.shape)


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """``w`` with the 2 smallest-magnitude entries of every group of 4 along the last dim set to 0."""
    return torch.where(mask_2_4(w), w.detach(), torch.zeros((), dtype=w.dtype, device=w.device))


def _cuda_sm80(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (8, 0)


def semi_structured_reason(weight: torch.Tensor, int8: bool = False) -> str | None:
    """Why ``weight`` (out, in) cannot use the GPU semi-structured matmul, or None if it can.

    Float: CUDA sm80+, fp16/bf16, out % 32 == 0 and in % 64 == 0 (the stricter of the
    cuSPARSELt and CUTLASS backends of ``torch.sparse.to_sparse_semi_structured``).
    int8: CUDA sm80+ with cuSPARSELt (``torch._cslt_sparse_mm``), out and in % 32 == 0.
    """
    if weight.device.type == "meta":
        return "on the meta device"
    if not _cuda_sm80(weight):
        return "not on a CUDA GPU of compute capability 8.0 or newer"
    out_f, in_f = weight.shape
    if int8:
        if not torch.backends.cusparselt.is_available():
            return "cuSPARSELt is not available in this PyTorch build"
        if out_f % 32 or in_f % 32:
            return f"shape {tuple(weight.shape)} is not a multiple of (32, 32)"
        return None
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {weight.dtype} (needs float16 or bfloat16)"
    if out_f % 32 or in_f % 64:
        return f"shape {tuple(weight.shape)} is not a multiple of (32, 64)"
    return None


def _repack_after_load(module: nn.Module, incompatible_keys) -> None:
    module.repack(prune=True)


class _Repacks:
    """Mixin: rebuild the derived compressed weight after device/dtype moves and loads."""

    def _init_repack(self) -> None:
        self._packed = None
        self.register_load_state_dict_post_hook(_repack_after_load)

    def _apply(self, fn, recurse=True):
        self._packed = None  # derived data: dropped, then rebuilt from the moved dense weight
        out = super()._apply(fn, recurse)
        self.repack()
        return out

    def __getstate__(self):  # copy.deepcopy / pickle: the derived weight is rebuilt, not copied
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.repack()

    @property
    def uses_semi_structured(self) -> bool:
        """Whether the forward runs the GPU 2:4 semi-structured matmul (else the dense fallback)."""
        return self._packed is not None


class Sparse24Linear(_Repacks, nn.Module):
    """y = x · W₂:₄ᵀ + b, W₂:₄ the magnitude-2:4-pruned weight.

    On CUDA (fp16/bf16, qualifying shapes) the weight is a
    ``torch.sparse.to_sparse_semi_structured`` tensor (half the weight bytes, sparse tensor
    cores); elsewhere the forward is ``F.linear`` with the pruned dense weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None
        self._init_repack()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Sparse24Linear":
        _check_float_weight(linear)
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype)
        m.weight = nn.Parameter(prune_2_4(w), requires_grad=False)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        m.repack()
        return m

    @torch.no_grad()
    def repack(self, prune: bool = False) -> None:
        """Re-derive the compressed weight (and, with ``prune``, re-prune the dense one)."""
        if prune and self.weight.device.type != "meta":  # a new tensor: never write into a loaded (mmap) one
            self.weight = nn.Parameter(prune_2_4(self.weight), requires_grad=False)
        self._packed = None
        if semi_structured_reason(self.weight) is None:
            self._packed = torch.sparse.to_sparse_semi_structured(self.weight.detach().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)
        return F.linear(x2, self._packed, self.bias).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, semi_structured={self.uses_semi_structured}")


def int8_sparse24_linear(x: torch.Tensor, packed: torch.Tensor, w_scales: torch.Tensor,
                         bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """int8 dynamic linear with a cuSPARSELt-compressed 2:4 int8 weight (CUDA only).

    Per-token int8 activations (``quantize_rows_int8``); ``torch._cslt_sparse_mm`` computes
    W·xᵀ with the per-channel weight scales as its alpha vector and writes the activation dtype;
    the per-token scales and the bias are applied after (one elementwise pass).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    q, s = quantize_rows_int8(x2)  # (M, K) int8, (M, 1) float32
    m = q.shape[0]
    pad = (-m) % 16  # cuSPARSELt int8: dense operand rows a multiple of 16
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
    y = torch._cslt_sparse_mm(packed, q.t(), alpha=w_scales, out_dtype=x.dtype).t()  # (M+pad, N)
    if pad:
        y = y[:m]
    y = y.float() * s
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], out_features)


class Int8DynamicSparse24Linear(_Repacks, Int8DynamicLinear):
    """``Int8DynamicLinear`` on the 2:4-pruned weight (pruned in float, then quantized per channel).

    On CUDA with cuSPARSELt the int8 weight is compressed with ``torch._cslt_compress`` and the
    forward is :func:`int8_sparse24_linear` (int8 2:4 sparse tensor cores); elsewhere it is
    ``fastzoo.ops.int8_dynamic_linear`` (our fused int8 GEMM / its reference) on the pruned
    int8 weight: the same math.
    """

    fuses_residual = False  # forward(x) only

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_repack()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8DynamicSparse24Linear":
        _check_float_weight(linear)
        pruned = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        pruned.weight = nn.Parameter(prune_2_4(linear.weight), requires_grad=False)
        pruned.bias = linear.bias
        m = super().from_linear(pruned)
        m.repack()
        return m

    @torch.no_grad()
    def repack(self, prune: bool = False) -> None:
        # int8 rounding keeps zeros at zero, so the quantized weight keeps the 2:4 pattern;
        # ``prune`` re-applies it to weights loaded from a state dict.
        if prune and self.weight.device.type != "meta":
            self.weight = prune_2_4(self.weight)
        self._packed = None
        if semi_structured_reason(self.weight, int8=True) is None:
            self._packed = torch._cslt_compress(self.weight.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None or x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        return int8_sparse24_linear(x, self._packed, self.scales.float(), self.bias, self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", semi_structured={self.uses_semi_structured}"
