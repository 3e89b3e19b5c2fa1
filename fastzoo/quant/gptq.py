"""GPTQ: Hessian-aware group-wise int4 weight quantization (Frantar et al., 2022).

For a linear layer ``y = W x`` and calibration inputs ``X`` (one column per token),
GPTQ quantizes the columns of ``W`` one at a time and, after each, spreads that column's
rounding error over the columns not yet quantized so as to minimise ``‖W X − Ŵ X‖²``.
The optimal update uses the inverse of ``H = 2 X Xᵀ``; GPTQ works with its upper Cholesky
factor, one ``blocksize`` block of columns at a time (lazy batch updates).

The result has exactly the layout of :class:`fastzoo.quant.Int4WeightOnlyLinear`
(asymmetric, per group of ``group_size`` input columns: ``w ≈ q · scale + zero`` with
``q ∈ [0, 15]``, ``zero`` the group minimum), so the same int4 kernels run it.  Group
parameters are taken from the error-updated weights when GPTQ reaches a group's first
column, and are rounded to the model's dtype before use, so the stored ``scales`` and
``zeros`` are exactly the ones whose error GPTQ compensated.

Pieces:

* :func:`gptq_quantize_weight` — one weight matrix given its Hessian;
* :class:`HessianCollector` — forward hooks that accumulate ``H`` for chosen linears;
* :func:`gptq_quantize_block_` — one block of a model (e.g. a decoder layer): collect the
  Hessians of its linears on calibration inputs, swap them for GPTQ-quantized int4
  linears, and return the block's outputs (through the quantized block) for the next one;
* :class:`GPTQ` — the configuration (its CLI name is ``gptq-g<group_size>``);
  ``quantize_(model, GPTQ(...), calibration=batches)`` quantizes any model from one pass.

The model-level, layer-by-layer driver for Llama is :func:`fastzoo.llama.quantize.gptq_quantize_llama_`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .api import QuantConfig, select_linears, swap_linear
from .linear import INT4_GROUP_SIZES, Int4WeightOnlyLinear
from fastzoo.ops.quantize_rows import EPS as _EPS


@dataclass(frozen=True)
class GPTQ(QuantConfig):
    """GPTQ int4 (group-wise, asymmetric): the layout and kernels of ``Int4WeightOnly(group_size)``.

    group_size: input columns per (scale, zero) pair — one of ``INT4_GROUP_SIZES``.
    blocksize: columns per lazy-update block; a multiple of ``group_size``.
    percdamp: dampening added to the Hessian's diagonal, as a fraction of its mean.
    """

    group_size: int = 128
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"GPTQ group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        if self.blocksize < self.group_size or self.blocksize % self.group_size:
            raise ValueError(f"GPTQ blocksize must be a positive multiple of group_size {self.group_size}, "
                             f"got {self.blocksize}")
        if not (0 <= self.percdamp < 1):
            raise ValueError(f"GPTQ percdamp must be in [0, 1), got {self.percdamp}")

    @property
    def name(self) -> str:
        return f"gptq-g{self.group_size}"

    needs_calibration = True

    def quantize_model_(self, model: nn.Module, calibration: Iterable,
                        filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
        """``quantize_(model, GPTQ(...), calibration=batches)``: the Hessians of every selected
        linear from one pass of ``model(*batch)`` over the batches (in eval mode), then each
        linear GPTQ-quantized (``gptq_quantize_block_`` with the whole model as the block)."""
        from .calibrate import _as_args

        was_training = model.training
        model.eval()
        try:
            gptq_quantize_block_(model, calibration, lambda m, batch: m(*_as_args(batch)), self, filter_fn,
                                 propagate=False)
        finally:
            model.train(was_training)
        return model

    def quantize_linear(self, linear: nn.Linear, hessian: torch.Tensor | None = None) -> nn.Module:
        if hessian is None:
            raise ValueError("GPTQ needs calibration data: quantize_(model, GPTQ(...), calibration=batches), "
                             "fastzoo.llama.quantize.gptq_quantize_llama_ or gptq_quantize_block_")
        w = linear.weight
        m = Int4WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                 self.group_size, device=w.device, dtype=w.dtype)
        packed, scales, zeros = gptq_quantize_weight(w, hessian, self.group_size, self.blocksize, self.percdamp,
                                                     param_dtype=w.dtype)
        m.weight, m.scales, m.zeros = packed, scales.to(w.dtype), zeros.to(w.dtype)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m


def _group_params(w: torch.Tensor, param_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of ``w (rows, group)``, as Int4WeightOnlyLinear.quantize, rounded to param_dtype."""
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    scale = torch.clamp(hi - lo, min=_EPS) / 15.0
    return scale.to(param_dtype).float(), lo.to(param_dtype).float()


def _upper_cholesky_of_inverse(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``; λ = percdamp · mean(diag H), raised until H is positive definite."""
    n = H.shape[0]
    damp = percdamp * torch.mean(torch.diag(H)).clamp(min=_EPS)
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp = damp * 10 if damp > 0 else torch.mean(torch.diag(H)).clamp(min=_EPS) * 1e-4
    raise ValueError("GPTQ: the Hessian is not positive definite even with dampening; "
                     "use more (or more varied) calibration tokens")


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, H: torch.Tensor, group_size: int = 128, blocksize: int = 128,
                         percdamp: float = 0.01, param_dtype: torch.dtype | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on ``weight (out, in)`` with Hessian ``H (in, in)`` (the sum or mean of ``2 x xᵀ``).

    Returns ``(packed uint8 (out, in/2), scales, zeros)`` in the layout of
    ``Int4WeightOnlyLinear.quantize``; ``scales`` and ``zeros`` are float32 holding values
    exactly representable in ``param_dtype`` (default: the weight's dtype).
    """
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"int4 with group_size={group_size} needs in_features divisible by it, "
                         f"found in_features={in_f}")
    if blocksize % group_size:
        raise ValueError(f"blocksize {blocksize} must be a multiple of group_size {group_size}")
    if tuple(H.shape) != (in_f, in_f):
        raise ValueError(f"Hessian must have shape ({in_f}, {in_f}), got {tuple(H.shape)}")
    param_dtype = param_dtype or (weight.dtype if weight.dtype.is_floating_point else torch.float32)
    W = weight.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: any value works, take them as zero
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _upper_cholesky_of_inverse(H, percdamp)

    n_groups = in_f // group_size
    Q = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
    scales = torch.empty(out_f, n_groups, dtype=torch.float32, device=W.device)
    zeros = torch.empty_like(scales)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        scale = zero = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # a new group starts: parameters from its error-updated weights
                scale, zero = _group_params(W1[:, i:i + group_size], param_dtype)
                scales[:, col // group_size], zeros[:, col // group_size] = scale, zero
            w = W1[:, i]
            q = torch.round((w - zero) / scale).clamp_(0, 15)
            Q[:, col] = q.to(torch.uint8)
            err = (w - (q * scale + zero)) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    packed = Q[:, 0::2] | (Q[:, 1::2] << 4)
    return packed, scales, zeros


class HessianCollector:
    """Accumulates ``H = 2/n Σ x xᵀ`` (fp32, on the input's device) over the rows fed to each hooked linear."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.H: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            n_new = x.shape[0]
            if name not in self.H:
                self.H[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                self.n[name] = 0
            n_old = self.n[name]
            self.H[name].mul_(n_old / (n_old + n_new))
            x = x * math.sqrt(2.0 / (n_old + n_new))
            self.H[name].addmm_(x.t(), x)
            self.n[name] = n_old + n_new
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def gptq_quantize_block_(block: nn.Module, inputs: Iterable, run: Callable, config: GPTQ,
                         filter_fn: Callable[[nn.Module, str], bool] | None = None,
                         propagate: bool = True) -> list:
    """GPTQ-quantize, in place, the linears of ``block`` selected by ``filter_fn`` (default: all).

    ``inputs`` is a list of calibration inputs (one per batch) and ``run(block, inp)``
    runs the block on one of them and returns its output.  All Hessians are collected in
    one pass over the float block, then every selected linear is replaced by an
    :class:`Int4WeightOnlyLinear`; with ``propagate``, the inputs are run again through the
    quantized block and its outputs returned (the next block's calibration inputs, which
    thus see this block's quantization error), else an empty list.
    """
    targets = dict(select_linears(block, filter_fn))
    inputs = list(inputs)
    collector = HessianCollector(targets)
    try:
        for inp in inputs:
            run(block, inp)
    finally:
        collector.remove()
    for fqn, m in targets.items():
        if fqn not in collector.H:
            raise ValueError(f"GPTQ: {fqn!r} was not called while running the calibration inputs")
        swap_linear(block, fqn, config, lambda m=m, H=collector.H.pop(fqn): config.quantize_linear(m, H))
    return [run(block, inp) for inp in inputs] if propagate else []
