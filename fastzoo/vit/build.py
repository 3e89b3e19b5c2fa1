"""Named ViT configurations (timm's names) and ``build_vit``."""
from __future__ import annotations

import os
import torch
from torch import nn

from fastzoo.checkpoint import load_checked, read_state_dict
from fastzoo.utils import parse_dtype

from .model import VisionTransformer, ViTConfig

# width, depth, heads of each size
_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
          "large": (1024, 24, 16), "huge": (1280, 32, 16)}
# (size, patch, resolution) that timm defines, and the class count of timm's default weights
# (0: no head, for the in21k / self-supervised defaults).
_VARIANTS = {
    ("tiny", 16, 224): 1000, ("tiny", 16, 384): 1000,
    ("small", 8, 224): 0, ("small", 16, 224): 1000, ("small", 16, 384): 1000,
    ("small", 32, 224): 1000, ("small", 32, 384): 1000,
    ("base", 8, 224): 1000, ("base", 16, 224): 1000, ("base", 16, 384): 1000,
    ("base", 32, 224): 1000, ("base", 32, 384): 1000,
    ("large", 14, 224): 1000, ("large", 16, 224): 1000, ("large", 16, 384): 1000,
    ("large", 32, 224): 0, ("large", 32, 384): 1000,
    ("huge", 14, 224): 0,
}


#: ``build_vit(compile=...)``'s strings: ``torch.compile`` modes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _make(size: str, patch: int, res: int, num_classes: int) -> ViTConfig:
    dim, depth, heads = _SIZES[size]
    return ViTConfig(img_size=res, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                     num_classes=num_classes)


VIT_CONFIGS: dict[str, ViTConfig] = {
    f"vit_{s}_patch{p}_{r}": _make(s, p, r, n) for (s, p, r), n in _VARIANTS.items()
}


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a timm/fastzoo ViT state dict (torch.save file or safetensors)."""
    return read_state_dict(path)


def _checkpoint_hint(cfg: ViTConfig, sd: dict) -> str | None:
    """What a float state dict that does not fit ``cfg`` probably is: its head's class count,
    and the named configs of its width, patch size and resolution."""
    hints = []
    head = sd.get("head.weight")
    if head is not None and head.dim() == 2 and head.shape[0] != cfg.num_classes:
        hints.append(f"its head has {head.shape[0]} classes: pass num_classes={head.shape[0]}")
    elif head is None and cfg.num_classes:
        hints.append("it has no head (no head.weight): pass num_classes=0")
    pos, proj = sd.get("pos_embed"), sd.get("patch_embed.proj.weight")
    if pos is not None and proj is not None and pos.dim() == 3 and proj.dim() == 4:
        width, patch, tokens = proj.shape[0], proj.shape[-1], pos.shape[1] - 1
        res = round(tokens**0.5) * patch
        if (width, patch, res) != (cfg.embed_dim, cfg.patch_size, cfg.img_size):
            names = [n for n, c in VIT_CONFIGS.items() if (c.embed_dim, c.patch_size, c.img_size) == (width, patch, res)]
            hints.append(f"it is a ViT of width {width}, patch {patch}, resolution {res}"
                         + (f": {' / '.join(names)}" if names else ""))
    return "; ".join(hints) or None


def build_vit(name: str, checkpoint: str | os.PathLike | None = None, *, dtype: torch.dtype | str = torch.float32,
              device: torch.device | str | None = None, compile: bool | str = False, quantize=None,
              calibration=None, num_classes: int | None = None, quantized_checkpoint: bool = False) -> nn.Module:
    """Build a ViT by timm name, optionally load a checkpoint, and make it ready for inference.

    checkpoint: a timm or fastzoo state dict (.pth/.pt/.bin or .safetensors), loaded strictly;
        without one the weights are random. quantize: a ``fastzoo.quant`` config or name applied
        to the blocks by ``fastzoo.quant.quantize_vit_``: ``"int8dq"`` / ``"int8dq-qattn"``
        (dynamic W8A8, SDPA or int8 attention), ``"int8static"`` / ``"int8static-qattn"``
        (static W8A8, needs ``calibration``: an iterable of image batches, run once in the
        model's dtype on ``device``), or weight-only ``"int8"`` / ``"int4-g128"``.
        quantized_checkpoint: ``checkpoint`` is the ``state_dict()`` of a model quantized with
        ``quantize`` (calibrated scales included): the quantized layout is built on the meta
        device and the checkpoint loaded strictly into it, no calibration; tensors take the
        dtypes that quantizing a ``dtype`` model gives (static scales: float32).
        compile: wrap in ``torch.compile``; a string is its ``mode``, e.g. ``"reduce-overhead"``
        (CUDA graphs: what small batches need, where launching a forward's kernels takes the
        host longer than running them; an output is overwritten by the next call, so clone
        what you keep). Returns the model in eval mode.
    """
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown ViT {name!r}; valid: {', '.join(VIT_CONFIGS)}")
    if isinstance(compile, str) and compile not in COMPILE_MODES:
        raise ValueError(f"compile expects True/False or a torch.compile mode among {COMPILE_MODES}, got {compile!r}")
    dtype = parse_dtype(dtype)
    cfg = VIT_CONFIGS[name]
    if num_classes is not None:
        cfg = ViTConfig(**{**cfg.__dict__, "num_classes": num_classes})
    if quantized_checkpoint and (checkpoint is None or quantize is None):
        raise ValueError("quantized_checkpoint=True needs the checkpoint and the quantize config it was saved with")
    source = f"checkpoint {str(checkpoint)!r}"
    sd = load_state_dict_file(checkpoint) if checkpoint is not None else None
    if quantize is not None:
        from fastzoo.quant import quantize_vit_
    if quantized_checkpoint:
        with torch.device("meta"):
            model = VisionTransformer(cfg).to(dtype)
        quantize_vit_(model, quantize, for_loading=True)  # the layout (and buffer dtypes) quantizing gives
        model.to_empty(device=device or "cpu")
        load_checked(model, sd, source,  # copies into that layout
                     hint=f"quantized_checkpoint=True expects the state_dict() of a ViT quantized with {quantize!r}")
        model.eval().requires_grad_(False)
    else:
        if sd is not None:
            with torch.device("meta"):
                model = VisionTransformer(cfg)
            hints = [_checkpoint_hint(cfg, sd)]
            if quantize is not None:
                hints.append("the state_dict() of a quantized ViT loads with quantized_checkpoint=True")
            load_checked(model, sd, source, assign=True, hint="; ".join(h for h in hints if h) or None)
        else:
            model = VisionTransformer(cfg)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if quantize is not None:
            quantize_vit_(model, quantize, calibration=calibration)
    if compile:
        model = torch.compile(model, mode=compile) if isinstance(compile, str) else torch.compile(model)
    return model
