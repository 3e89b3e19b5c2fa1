"""fastzoo.quant: ``quantize_(model, config)`` swaps linear layers for quantized ones.

    from fastzoo.quant import quantize_, Int8WeightOnly, Int8Dynamic, Int4WeightOnly
    quantize_(model, Int8WeightOnly())
    quantize_(model, "int4-g128")            # the CLI strings: fastzoo.quant.CONFIGS
    quantize_(model, Sparse24())             # 2:4 pruning (semi-structured sparse matmul on CUDA)
    quantize_(model, Int8Static(observer="percentile"), calibration=batches)   # static W8A8
    quantize_vit_(vit, Int8Static(attention="int8"), calibration=batches)      # fused int8 ViT blocks
    quantize_image_encoder_(sam.image_encoder, "int8dq")                      # SAM's encoder linears
"""
from .api import (ACTIVATION_CONFIGS, CONFIGS, INT4_GROUP_SIZES, Int4WeightOnly, Int8Dynamic, Int8DynamicSparse24,
                  Int8Static, Int8WeightOnly, QuantConfig, Sparse24, config_from_string, quantize_)
from .calibrate import MinMaxObserver, PercentileObserver, observe
from .gptq import GPTQ, gptq_quantize_weight  # GPTQ (calibrated int4, Int4WeightOnly layout)
from .linear import Int4WeightOnlyLinear, Int8DynamicLinear, Int8StaticLinear, Int8WeightOnlyLinear
from .sparse import Int8DynamicSparse24Linear, Sparse24Linear, mask_2_4, prune_2_4
from .vit import Int8GeluMlp, Int8ViTBlock, quantize_image_encoder_, quantize_vit_

__all__ = [
    "CONFIGS", "INT4_GROUP_SIZES", "Int4WeightOnly", "Int8Dynamic", "Int8WeightOnly", "QuantConfig",
    "config_from_string", "quantize_", "Int4WeightOnlyLinear", "Int8DynamicLinear", "Int8WeightOnlyLinear",
    "Int8DynamicSparse24", "Sparse24", "Int8DynamicSparse24Linear", "Sparse24Linear", "mask_2_4", "prune_2_4",
    "GPTQ", "gptq_quantize_weight",
    "ACTIVATION_CONFIGS", "Int8Static", "Int8StaticLinear", "MinMaxObserver", "PercentileObserver", "observe",
    "Int8GeluMlp", "Int8ViTBlock", "quantize_vit_", "quantize_image_encoder_",
]
