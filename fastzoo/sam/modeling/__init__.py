"""SAM modules (state-dict compatible with Meta's segment_anything checkpoints)."""
from .attention import plain_attention, rel_pos_attention
from .common import LayerNorm2d, MLPBlock
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer

__all__ = [
    "ImageEncoderViT",
    "LayerNorm2d",
    "MLPBlock",
    "MaskDecoder",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
    "plain_attention",
    "rel_pos_attention",
]
