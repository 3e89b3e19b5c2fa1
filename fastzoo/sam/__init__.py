"""SAM (Segment Anything) in native PyTorch: a drop-in replacement for ``segment_anything``.

    from fastzoo.sam import sam_model_registry, SamPredictor, SamAutomaticMaskGenerator
"""
from .automatic_mask_generator import SamAutomaticMaskGenerator
from .build import (
    SAM_CONFIGS,
    SamCheckpointError,
    build_sam,
    build_sam_fast,
    build_sam_from_config,
    build_sam_model,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    load_state_dict_checked,
    read_checkpoint,
    sam_model_registry,
)
from .modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from .predictor import SamPredictor
from .transforms import ResizeLongestSide

__all__ = [
    "ImageEncoderViT",
    "MaskDecoder",
    "PromptEncoder",
    "ResizeLongestSide",
    "SAM_CONFIGS",
    "Sam",
    "SamAutomaticMaskGenerator",
    "SamCheckpointError",
    "SamPredictor",
    "TwoWayTransformer",
    "build_sam",
    "build_sam_fast",
    "build_sam_from_config",
    "build_sam_model",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "load_state_dict_checked",
    "read_checkpoint",
    "sam_model_registry",
]
