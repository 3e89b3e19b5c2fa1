"""fastzoo.ops: custom kernels, each with a pure-PyTorch reference beside it.

See ``fastzoo/ops/README.md`` for the pattern every op follows.
"""
from .int8_mm import (int8_dynamic_linear, int8_dynamic_linear_ref, int8_scaled_mm, int8_scaled_mm_ref,
                      int8_scaled_mm_triton)
from .rel_pos_attention import (rel_pos_attention, rel_pos_attention_packed, rel_pos_attention_ref,
                                rel_pos_attention_triton, rel_pos_window_attention, rel_pos_window_attention_ref,
                                rel_pos_window_attention_triton)
from .weight_only_linear import (decode_linear, decode_linear_ref, decode_linear_triton, int4_dequantize,
                                 int4_dequantize_ref, int4_dequantize_triton, int4_weight_only_linear,
                                 int4_weight_only_linear_ref, int4_weight_only_linear_triton,
                                 int8_weight_only_linear, int8_weight_only_linear_ref,
                                 int8_weight_only_linear_triton)
from .quantize_rows import quantize_rows_int8, quantize_rows_int8_ref, quantize_rows_int8_triton
from .layernorm_quant import layernorm_quant_int8, layernorm_quant_int8_ref, layernorm_quant_int8_triton
from .int8_attention import int8_attention, int8_attention_ref, int8_attention_triton
from .decode_attention import apply_rope, decode_attention, decode_attention_ref, decode_attention_triton
from .lamport_all_reduce import lamport_all_reduce_ref, lamport_all_reduce_triton
from .linear_act import linear_act, linear_act_ref, linear_act_triton

__all__ = [
    "int8_dynamic_linear", "int8_dynamic_linear_ref", "int8_scaled_mm", "int8_scaled_mm_ref",
    "int8_scaled_mm_triton",
    "rel_pos_attention", "rel_pos_attention_packed", "rel_pos_attention_ref", "rel_pos_attention_triton",
    "rel_pos_window_attention", "rel_pos_window_attention_ref", "rel_pos_window_attention_triton",
    "decode_linear", "decode_linear_ref", "decode_linear_triton",
    "int8_weight_only_linear", "int8_weight_only_linear_ref", "int8_weight_only_linear_triton",
    "int4_weight_only_linear", "int4_weight_only_linear_ref", "int4_weight_only_linear_triton",
    "int4_dequantize", "int4_dequantize_ref", "int4_dequantize_triton",
    "quantize_rows_int8", "quantize_rows_int8_ref", "quantize_rows_int8_triton",
    "layernorm_quant_int8", "layernorm_quant_int8_ref", "layernorm_quant_int8_triton",
    "int8_attention", "int8_attention_ref", "int8_attention_triton",
    "apply_rope", "decode_attention", "decode_attention_ref", "decode_attention_triton",
    "lamport_all_reduce_ref", "lamport_all_reduce_triton",
    "linear_act", "linear_act_ref", "linear_act_triton",
]
