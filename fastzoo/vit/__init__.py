"""fastzoo.vit: timm-compatible Vision Transformers.

    from fastzoo.vit import build_vit
    model = build_vit("vit_base_patch16_224", "vit_base.safetensors", dtype=torch.bfloat16, device="cuda")
"""
from fastzoo.checkpoint import CheckpointError

from .build import VIT_CONFIGS, build_vit, load_state_dict_file
from .model import VisionTransformer, ViTConfig

__all__ = ["VIT_CONFIGS", "CheckpointError", "build_vit", "load_state_dict_file", "VisionTransformer", "ViTConfig"]
