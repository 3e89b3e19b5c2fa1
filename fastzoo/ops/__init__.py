"""fastzoo.ops: custom kernels, each with a pure-PyTorch reference beside it.

See ``fastzoo/ops/README.md`` for the pattern every op follows.
"""
from .quantize_rows import quantize_rows_int8, quantize_rows_int8_ref, quantize_rows_int8_triton

__all__ = ["quantize_rows_int8", "quantize_rows_int8_ref", "quantize_rows_int8_triton"]
