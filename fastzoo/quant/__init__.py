"""fastzoo.quant: ``quantize_(model, config)`` swaps linear layers for quantized ones.

    from fastzoo.quant import quantize_, Int8WeightOnly, Int8Dynamic, Int4WeightOnly
    quantize_(model, Int8WeightOnly())
    quantize_(model, "int4-g128")            # the CLI strings: fastzoo.quant.CONFIGS
    quantize_(model, Sparse24())             # 2:4 pruning (semi-structured sparse matmul on CUDA)
"""
from .api import (CONFIGS, INT4_GROUP_SIZES, Int4WeightOnly, Int8Dynamic, Int8WeightOnly, QuantConfig,
                  config_from_string, quantize_)
from .linear import Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from .api import Int8DynamicSparse24, Sparse24
from .sparse import Int8DynamicSparse24Linear, Sparse24Linear, mask_2_4, prune_2_4
from .gptq import GPTQ, gptq_quantize_weight  # GPTQ (calibrated int4, Int4WeightOnly layout)

__all__ = [
    "CONFIGS", "INT4_GROUP_SIZES", "Int4WeightOnly", "Int8Dynamic", "Int8WeightOnly", "QuantConfig",
    "config_from_string", "quantize_", "Int4WeightOnlyLinear", "Int8DynamicLinear", "Int8WeightOnlyLinear",
    "Int8DynamicSparse24", "Sparse24", "Int8DynamicSparse24Linear", "Sparse24Linear", "mask_2_4", "prune_2_4",
    "GPTQ", "gptq_quantize_weight",
]
