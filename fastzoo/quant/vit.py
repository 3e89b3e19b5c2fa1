"""int8 ViT blocks (dynamic or static W8A8, optional int8 attention) and the one-call quantizers.

    from fastzoo.quant import Int8Dynamic, Int8Static, quantize_vit_
    quantize_vit_(model, Int8Dynamic())                                   # no calibration
    quantize_vit_(model, Int8Static(observer="percentile"), calibration=batches)
    # or: build_vit(name, ckpt, quantize="int8static", calibration=batches)
    # (attention="int8" / "int8static-qattn": int8 attention, slower than bf16 SDPA for ViT-L/16
    # on an H100: experiments/results/h100-80gb-hbm3/vit_epilogue_patch_embed_ab.json)

``quantize_vit_`` replaces each ``fastzoo.vit`` block by an ``Int8ViTBlock`` whose forward
chains the fused ops so that no activation makes an extra trip through memory:

- ``layernorm_quant_int8``: the pre-norms write int8 (per-token scales when dynamic, the
  calibrated scale when static) straight into the qkv and fc1 GEMMs;
- ``int8_scaled_mm`` epilogues: fc1 applies GELU (and, static, writes int8 for fc2);
  proj and fc2 add the residual; static qkv writes int8 q, k, v (one calibrated scale each);
- attention: ``"int8"`` → ``int8_attention`` on views of the qkv output (dynamic: q, k, v
  quantized per token and head first; static: int8 out for proj), ``"sdpa"`` → bf16 SDPA.

The block keeps the float block's parameter names (``norm1``, ``attn.qkv``, ``attn.proj``,
``norm2``, ``mlp.fc1``, ``mlp.fc2``) with quantized linears (``Int8DynamicLinear`` /
``Int8StaticLinear`` buffers), so a quantized state dict round-trips: save
``model.state_dict()``; to load it, build the same ViT (on the meta device, say), call
``quantize_vit_(model, config, for_loading=True)`` (the quantized layout, no calibration), then
``load_state_dict(sd, strict=True, assign=True)`` — or ``build_vit(name, path, quantize=config,
quantized_checkpoint=True)``. The patch embedding, final norm and head stay in float.

``quantize_image_encoder_`` offers the same configs for SAM's image encoder (its linears;
SAM's attention adds a decomposed relative-position bias that ``int8_attention`` does not).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastzoo.ops import int8_attention, int8_scaled_mm, layernorm_quant_int8, quantize_rows_int8
from fastzoo.ops.int8_mm import int8_dynamic_linear, requantize_int8_ref

from .api import (ACTIVATION_CONFIGS, CONFIGS, Int8Dynamic, Int8DynamicSparse24, Int8Static, QuantConfig, Sparse24,
                  as_config, config_from_string, quantize_)
from .calibrate import observe
from .linear import Int8DynamicLinear, Int8StaticLinear


class _Attn(nn.Module):
    def __init__(self, qkv: nn.Module, proj: nn.Module, num_heads: int):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, qkv, proj


class _Mlp(nn.Module):
    def __init__(self, fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2


class Int8ViTBlock(nn.Module):
    """A ViT block with int8 linears (see the module doc); ``static`` and ``attention`` fixed
    at construction. Built by ``quantize_vit_``."""

    def __init__(self, block: nn.Module, static: bool, attention: str, qkv: nn.Module, proj: nn.Module,
                 fc1: nn.Module, fc2: nn.Module):
        super().__init__()
        self.static, self.attention = static, attention
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.attn = _Attn(qkv, proj, block.attn.num_heads)
        self.mlp = _Mlp(fc1, fc2)

    def _norm_quant(self, norm: nn.LayerNorm, x: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
        return layernorm_quant_int8(x, norm.weight, norm.bias, norm.eps, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H = self.attn.num_heads
        D = C // H
        dt = x.dtype
        x2 = x.reshape(B * N, C)
        qkv_l, proj_l, fc1_l, fc2_l = self.attn.qkv, self.attn.proj, self.mlp.fc1, self.mlp.fc2
        static = self.static
        # Scales are fp32 for the kernels; ``.to(dtype)`` on the model casts float buffers.
        sc = {n: {k: getattr(l, k).float() for k in ("scales", "in_scale", "out_scale") if getattr(l, k, None) is not None}
              for n, l in (("qkv", qkv_l), ("proj", proj_l), ("fc1", fc1_l), ("fc2", fc2_l))}

        # --- attention
        a_q, a_s = self._norm_quant(self.norm1, x2, sc["qkv"]["in_scale"] if static else None)
        int8_qkv = static and self.attention == "int8"
        qkv = int8_scaled_mm(a_q, qkv_l.weight, a_s, sc["qkv"]["scales"], qkv_l.bias,
                             torch.int8 if int8_qkv else dt,
                             out_scale=sc["qkv"]["out_scale"] if int8_qkv else None)
        qkv5 = qkv.view(B, N, 3, H, D)
        if self.attention == "int8":
            if int8_qkv:  # one calibrated scale per q / k / v (the qkv GEMM's per-channel out_scale)
                s = sc["qkv"]["out_scale"].view(3, C)[:, 0]
                q8, scales = qkv5, [s[i:i + 1] for i in range(3)]
            else:  # per token and head
                q8, s5 = quantize_rows_int8(qkv5)
                scales = [s5[:, :, i, :, 0].transpose(1, 2) for i in range(3)]
            q, k, v = (q8[:, :, i].transpose(1, 2) for i in range(3))
            o = int8_attention(q, k, v, *scales, out_dtype=torch.int8 if static else dt,
                               out_scale=sc["proj"]["in_scale"] if static else None)
        else:
            q, k, v = (qkv5[:, :, i].transpose(1, 2) for i in range(3))
            o = F.scaled_dot_product_attention(q, k, v)
        o = o.transpose(1, 2).reshape(B * N, C)
        if static:
            o8 = o if o.dtype == torch.int8 else requantize_int8_ref(o, sc["proj"]["in_scale"])
            x2 = int8_scaled_mm(o8, proj_l.weight, sc["proj"]["in_scale"], sc["proj"]["scales"], proj_l.bias, dt, residual=x2)
        else:
            x2 = int8_dynamic_linear(o, proj_l.weight, sc["proj"]["scales"], proj_l.bias, residual=x2)

        # --- MLP
        h_q, h_s = self._norm_quant(self.norm2, x2, sc["fc1"]["in_scale"] if static else None)
        if static:  # fc1 + GELU → int8 with fc2's input scale; fc2 + residual
            h8 = int8_scaled_mm(h_q, fc1_l.weight, h_s, sc["fc1"]["scales"], fc1_l.bias, torch.int8, activation="gelu",
                                out_scale=sc["fc2"]["in_scale"])
            x2 = int8_scaled_mm(h8, fc2_l.weight, sc["fc2"]["in_scale"], sc["fc2"]["scales"], fc2_l.bias, dt, residual=x2)
        else:
            h = int8_scaled_mm(h_q, fc1_l.weight, h_s, sc["fc1"]["scales"], fc1_l.bias, dt, activation="gelu")
            x2 = int8_dynamic_linear(h, fc2_l.weight, sc["fc2"]["scales"], fc2_l.bias, residual=x2)
        return x2.reshape(B, N, C)

    def extra_repr(self) -> str:
        return f"static={self.static}, attention={self.attention!r}"


_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # each block's int8 linears


def _vit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from fastzoo.vit.model import Block

    blocks = [(f"blocks.{i}", b) for i, b in enumerate(getattr(model, "blocks", []))]
    if not blocks or not all(isinstance(b, Block) for _, b in blocks):
        raise TypeError(f"quantize_vit_ expects a fastzoo.vit VisionTransformer with float blocks, "
                        f"got {type(model).__name__}")
    return blocks


def quantize_vit_(model: nn.Module, config: QuantConfig | str, calibration=None, *,
                  for_loading: bool = False) -> nn.Module:
    """Quantize a ``fastzoo.vit`` VisionTransformer's blocks in place; returns ``model``.

    ``config``: ``Int8Dynamic(attention=...)`` or ``Int8Static(...)`` (or their names
    ``"int8dq"``, ``"int8dq-qattn"``, ``"int8static"``, ``"int8static-qattn"``); any other
    config (weight-only int8/int4) quantizes the blocks' linears with ``quantize_``.
    ``calibration`` (static only): an iterable of image batches, run through the float
    model once with observers on every int8 layer's input (and on q, k, v).
    ``for_loading``: build only the quantized layout (same modules, buffers and shapes) to load
    a quantized state dict into: no calibration runs and the static scales are placeholders (1);
    works on the meta device.
    """
    config = as_config(config)
    blocks = _vit_blocks(model)
    if not isinstance(config, (Int8Dynamic, Int8Static)):
        return quantize_(model, config, filter_fn=_encoder_linears)
    static = isinstance(config, Int8Static)
    int8_qkv = static and config.attention == "int8"  # qkv writes int8 q, k, v: per-channel out_scale
    if static and for_loading:  # placeholders of the calibrated scales' shapes, overwritten by the load
        in_scales = {f"{n}.{lin}": torch.ones(1) for n, _ in blocks for lin in _LINEARS}
        qkv_scales = {f"{n}.attn.qkv": torch.ones(3) for n, _ in blocks} if int8_qkv else {}
    elif static:
        if calibration is None:
            raise ValueError(f"{config.name} needs calibration batches: quantize_vit_(model, config, calibration=batches)"
                             f" or build_vit(..., quantize={config.name!r}, calibration=batches); to load a "
                             f"quantized state dict: quantize_vit_(model, config, for_loading=True)")
        inputs = {f"{n}.{lin}": config.observer_for() for n, _ in blocks for lin in _LINEARS}
        outputs, transform = {}, {}
        if int8_qkv:
            for n, b in blocks:  # q, k, v: one scale each (per tensor), observed on the qkv output
                C = b.attn.qkv.in_features
                outputs[f"{n}.attn.qkv"] = config.observer_for(per_channel=True)
                transform[f"{n}.attn.qkv"] = lambda t, C=C: t.reshape(-1, 3, C).transpose(1, 2).reshape(-1, 3)
        observe(model, calibration, inputs=inputs, outputs=outputs, transform=transform)
        in_scales = {k: o.scale() for k, o in inputs.items()}
        qkv_scales = {k: o.scale() for k, o in outputs.items()}  # (3,): q, k, v
    for n, b in blocks:
        lin = {name: b.get_submodule(name) for name in _LINEARS}
        if static:
            q = {}
            for name, l in lin.items():
                out_scale = None
                if name == "attn.qkv" and int8_qkv:  # per channel: q, k, v segments
                    out_scale = qkv_scales[f"{n}.attn.qkv"].repeat_interleave(l.in_features)
                q[name] = config.quantize_linear(l, in_scales[f"{n}.{name}"], out_scale)
        else:
            q = {name: Int8DynamicLinear.from_linear(l) for name, l in lin.items()}
        new = Int8ViTBlock(b, static, config.attention, q["attn.qkv"], q["attn.proj"], q["mlp.fc1"], q["mlp.fc2"])
        model.blocks[int(n.split(".")[1])] = new
    return model


def _encoder_linears(m: nn.Module, fqn: str) -> bool:
    return isinstance(m, nn.Linear) and fqn.startswith("blocks.")


#: Named mixes of configs over the encoder blocks' linears (names after ``blocks.N.``), the
#: ``quantize=`` options of ``fastzoo.sam.build_sam_fast``: ``"int8"`` int8 dynamic everywhere;
#: ``"sparse"`` 2:4 on the MLPs; ``"int8+sparse"`` torchao's best mix for SAM (int8 dynamic on
#: attention, int8 dynamic + 2:4 on lin1, 2:4 on lin2).
ENCODER_QUANT_PLANS: dict[str, tuple[tuple[QuantConfig, tuple[str, ...]], ...]] = {
    "int8": ((Int8Dynamic(), ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")),),
    "sparse": ((Sparse24(), ("mlp.lin1", "mlp.lin2")),),
    "int8+sparse": (
        (Int8Dynamic(), ("attn.qkv", "attn.proj")),
        (Int8DynamicSparse24(), ("mlp.lin1",)),
        (Sparse24(), ("mlp.lin2",)),
    ),
}


def _linears_only(config: QuantConfig) -> bool:
    return getattr(config, "attention", "sdpa") == "sdpa"


#: Every name ``quantize_image_encoder_`` / ``build_sam_fast(quantize=...)`` accepts: the plans
#: above, then the ``fastzoo.quant`` config names (``config_from_string``) that quantize linears
#: only (``int8dq``, ``int8static``, ``int4-g128``, ``sparse24``, …; not the ``-qattn`` ones).
#: The plan ``"int8"`` (int8 dynamic) shadows the weight-only config of that name.
IMAGE_ENCODER_QUANT_NAMES: tuple[str, ...] = tuple(dict.fromkeys([
    *ENCODER_QUANT_PLANS, *(n for n, c in {**CONFIGS, **ACTIVATION_CONFIGS}.items() if _linears_only(c))]))


def resolve_image_encoder_quant(quantize: QuantConfig | str) -> QuantConfig | str:
    """Check a ``quantize=`` option of a SAM-style image encoder before any work is done.

    Returns a plan name of ``ENCODER_QUANT_PLANS`` as is and anything else as its
    ``QuantConfig``. A ``ValueError`` names what was given and what is accepted: an unknown
    name, or ``attention="int8"`` (SAM's attention adds a decomposed relative-position bias
    that ``int8_attention`` does not implement).
    """
    accepted = (f"None, one of {', '.join(IMAGE_ENCODER_QUANT_NAMES)}, or a fastzoo.quant config "
                f"(e.g. Int8Dynamic(), Int8Static(observer='percentile')) with attention='sdpa'")
    if isinstance(quantize, str):
        if quantize in ENCODER_QUANT_PLANS:
            return quantize
        try:
            config = config_from_string(quantize)
        except ValueError:
            raise ValueError(f"unknown quantize={quantize!r} for SAM's image encoder; expected {accepted}") from None
    elif isinstance(quantize, QuantConfig):
        config = quantize
    else:
        raise TypeError(f"quantize for SAM's image encoder expects {accepted}; got a {type(quantize).__name__}")
    if not _linears_only(config):
        raise ValueError(f"quantize={quantize!r}: attention={config.attention!r} is not available for SAM's image "
                         f"encoder (its attention adds a decomposed relative-position bias that int8_attention does "
                         f"not implement); expected {accepted}")
    return config


class Int8GeluMlp(nn.Module):
    """``lin2(GELU(lin1(x)))`` with int8 linears and the GELU in lin1's GEMM epilogue: static
    (``Int8StaticLinear``), lin1 writes int8 with lin2's calibrated input scale; dynamic
    (``Int8DynamicLinear``), lin1 writes x's dtype. The hidden activation (4× the width)
    makes one trip through memory instead of three (lin1 out, GELU in and out, or a
    quantization pass); ``residual`` is added in lin2's epilogue. Keeps the MLP's ``lin1``/``lin2`` names (its activation has no
    parameters), so state-dict keys do not change. Built by ``quantize_image_encoder_``."""

    def __init__(self, lin1: nn.Module, lin2: nn.Module):
        super().__init__()
        self.lin1, self.lin2 = lin1, lin2

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.lin1, Int8StaticLinear):  # int8 between the two: lin2 writes x's dtype
            h = self.lin1(x, activation="gelu", out_scale=self.lin2.in_scale)
            return self.lin2(h, residual=residual, out_dtype=x.dtype if x.is_floating_point() else None)
        return self.lin2(self.lin1(x, activation="gelu"), residual=residual)


class Int8StaticLayerNorm(nn.Module):
    """A pre-norm whose output feeds a static int8 linear: ``LayerNorm`` and that linear's input
    quantization in one pass (``fastzoo.ops.layernorm_quant_int8``), writing int8 with the
    linear's calibrated ``in_scale``, which the linear takes as already quantized. Keeps the
    norm's ``weight``/``bias`` (same state-dict keys). The linear is held outside the module
    tree (not a submodule: no state-dict entry, not moved twice) and its ``in_scale`` read at
    each call, so a move, a cast or a state-dict load of the model (``assign=True`` too) is
    seen here. Built by ``quantize_image_encoder_`` for static SAM encoders: its blocks'
    LayerNorm and quantization were one kernel of torch.compile's that read the row twice
    (vit_h's 1280 channels at a third of the copy bandwidth)."""

    def __init__(self, norm: nn.LayerNorm, reader: Int8StaticLinear):
        super().__init__()
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self._reader = (reader,)  # a tuple: nn.Module does not register what is inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_scale = self._reader[0].in_scale.float()
        return layernorm_quant_int8(x, self.weight, self.bias, self.eps, in_scale)[0]

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


def _static_int8_input(m: nn.Module) -> Int8StaticLinear | None:
    """The Int8StaticLinear that first reads ``m``'s input: ``m`` itself (a SAM block's qkv) or
    the lin1 of a SAM MLP (``MLPBlock`` / ``Int8GeluMlp``); None where that is no such linear,
    or one without a bias (an int8 input leaves its output dtype to the bias; without one it
    would be bf16 whatever the model's dtype)."""
    lin = m.lin1 if type(m).__name__ in ("MLPBlock", "Int8GeluMlp") else m
    return lin if type(lin) is Int8StaticLinear and lin.bias is not None else None


def _fuse_norm_quant(encoder: nn.Module) -> None:
    """In each SAM image-encoder block (fastzoo's or segment_anything's: ``norm1`` → ``attn.qkv``,
    ``norm2`` → ``mlp``), swap an exact ``nn.LayerNorm`` over the last dimension for an
    ``Int8StaticLayerNorm`` where what reads its output first is an ``Int8StaticLinear``."""
    for block in encoder.modules():
        children = dict(block.named_children())
        if not {"norm1", "attn", "norm2", "mlp"} <= children.keys() or not hasattr(children["attn"], "qkv"):
            continue
        for norm_name, reader in (("norm1", children["attn"].qkv), ("norm2", children["mlp"])):
            norm, lin = children[norm_name], _static_int8_input(reader)
            if lin is None or type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
                continue
            setattr(block, norm_name, Int8StaticLayerNorm(norm, lin))


def _fuse_gelu_mlps(encoder: nn.Module) -> None:
    """Swap each SAM ``MLPBlock`` (fastzoo's or segment_anything's: exactly the children
    ``lin1``, ``act``, ``lin2``, the activation an exact ``nn.GELU()``) whose linears are both
    ``Int8StaticLinear`` (lin1 with float output) or both ``Int8DynamicLinear`` for an
    ``Int8GeluMlp``; other MLPs (weight-only, 2:4 sparse, tanh GELU) stay as they are."""
    for name, m in list(encoder.named_modules()):
        if type(m).__name__ != "MLPBlock" or {n for n, _ in m.named_children()} != {"lin1", "act", "lin2"}:
            continue
        lin1, lin2, act = m.lin1, m.lin2, m.act
        if not (type(act) is nn.GELU and act.approximate == "none"):
            continue
        static = type(lin1) is Int8StaticLinear and type(lin2) is Int8StaticLinear and lin1.out_scale is None
        dynamic = type(lin1) is Int8DynamicLinear and type(lin2) is Int8DynamicLinear
        if static or dynamic:
            parent, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent) if parent else encoder, child, Int8GeluMlp(lin1, lin2))


def quantize_image_encoder_(encoder: nn.Module, config: QuantConfig | str, calibration=None) -> nn.Module:
    """Quantize the linears of a ViT image encoder's blocks (SAM's ``ImageEncoderViT``:
    ``blocks.*.attn.qkv/proj``, ``blocks.*.mlp.lin1/lin2``) in place; returns ``encoder``.

    ``config``: a name of ``ENCODER_QUANT_PLANS`` (``"int8"``, ``"sparse"``, ``"int8+sparse"``,
    which take precedence over ``quantize_``'s strings of the same name), or any config:
    ``Int8Dynamic()`` / ``"int8dq"``: per-token dynamic W8A8. ``Int8Static(...)`` /
    ``"int8static"``: static W8A8 calibrated on ``calibration`` (an iterable of preprocessed
    image batches, ``encoder(batch)``). Weight-only configs work too. ``attention="int8"``
    is refused: SAM's attention adds a decomposed relative-position bias, which
    ``int8_attention`` does not implement (its linears are quantized either way). The
    accepted names: ``IMAGE_ENCODER_QUANT_NAMES``; checked by ``resolve_image_encoder_quant``.
    """
    config = resolve_image_encoder_quant(config)
    if isinstance(config, str):  # a plan
        for cfg, names in ENCODER_QUANT_PLANS[config]:
            quantize_(encoder, cfg, filter_fn=lambda m, fqn, names=names: (
                _encoder_linears(m, fqn) and fqn.split(".", 2)[2] in names))
    else:
        quantize_(encoder, config, filter_fn=_encoder_linears, calibration=calibration)
    _fuse_gelu_mlps(encoder)
    _fuse_norm_quant(encoder)
    return encoder
