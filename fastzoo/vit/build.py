"""Named ViT configurations (timm's names) and ``build_vit``."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

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


def _make(size: str, patch: int, res: int, num_classes: int) -> ViTConfig:
    dim, depth, heads = _SIZES[size]
    return ViTConfig(img_size=res, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                     num_classes=num_classes)


VIT_CONFIGS: dict[str, ViTConfig] = {
    f"vit_{s}_patch{p}_{r}": _make(s, p, r, n) for (s, p, r), n in _VARIANTS.items()
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a timm/fastzoo ViT state dict from .pth/.pt/.bin (torch) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return sd


def load_into(model: VisionTransformer, sd: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """``load_state_dict(strict=True, assign=True)`` with errors naming keys and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing keys {missing[:5]}"
                              f"{'…' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                              f"{'…' if len(unexpected) > 5 else ''}")
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)}, "
                                  f"the model expects {tuple(v.shape)}")
    model.load_state_dict(sd, strict=True, assign=True)


def build_vit(name: str, checkpoint: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None, compile: bool = False, quantize=None,
              num_classes: int | None = None) -> nn.Module:
    """Build a ViT by timm name, optionally load a checkpoint, and make it ready for inference.

    checkpoint: a timm or fastzoo state dict (.pth/.pt/.bin or .safetensors), loaded strictly;
        without one the weights are random. quantize: a ``fastzoo.quant`` config or CLI string
        (``"int8dq"``, ``"int8"``, …) applied to the blocks' linear layers. compile: wrap in
        ``torch.compile``. Returns the model in eval mode.
    """
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown ViT {name!r}; valid: {', '.join(VIT_CONFIGS)}")
    cfg = VIT_CONFIGS[name]
    if num_classes is not None:
        cfg = ViTConfig(**{**cfg.__dict__, "num_classes": num_classes})
    if checkpoint is not None:
        sd = load_state_dict_file(checkpoint)
        with torch.device("meta"):
            model = VisionTransformer(cfg)
        load_into(model, sd, source=str(checkpoint))
    else:
        model = VisionTransformer(cfg)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if quantize is not None:
        from fastzoo.quant import quantize_

        quantize_(model, quantize, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith("blocks."))
    if compile:
        model = torch.compile(model)
    return model
