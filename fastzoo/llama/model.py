"""Decoder-only Llama-family Transformer in plain PyTorch.

* RMSNorm, SwiGLU MLP (fused ``w13`` = ``[w1; w3]``), grouped-query attention with a fused
  ``wqkv`` projection, RoPE (optionally with Llama-3.1 or linear frequency scaling).
* RoPE convention: the "rotate-half" layout used by Hugging Face checkpoints (the two
  halves of each head are the real / imaginary parts).  Meta ``consolidated.*.pth``
  checkpoints (interleaved pairs) are permuted at conversion time.
* Static KV cache per layer (``setup_caches``), written at per-sequence positions.  The
  attention mask is built on the device from the per-sequence positions: a query at
  position ``p`` sees cache slots ``0..p``.  Prompts of different lengths are right-padded;
  the slots a padded prompt wrote beyond its length are overwritten by its own decoded
  tokens before they ever become visible, so padding never leaks into attention.
* Each projection goes through :func:`fused_linear`: the RMSNorm before ``wqkv``, ``w13``
  and ``output``, the SwiGLU before ``w2`` and the residual adds after ``wo`` and ``w2`` are
  fused into the linear where the module implements ``fused_forward`` (:class:`Linear`,
  ``fastzoo.quant.Int8WeightOnlyLinear``: on CUDA the decode kernels of
  :func:`fastzoo.ops.decode_linear`), and composed in plain PyTorch for any other module.
* With a cache (bf16/fp16/fp32, or int8 with a scale per token and head), RoPE, the cache
  write and the masked attention are one op, :func:`fastzoo.ops.decode_attention` (its
  reference is this math; on CUDA one decode token runs a fused Triton kernel); the
  cache-less path stays inline.

This module is the eager reference: it runs on CPU and GPU; speed comes from
``torch.compile`` in :mod:`fastzoo.llama.generate`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastzoo import ops
from fastzoo.ops import apply_rope  # one RoPE, shared with fastzoo.ops.decode_attention
from fastzoo.ops.decode_attention import rope_cos_sin as _cos_sin
from fastzoo.ops.quantize_rows import quantize_rows_int8_ref
from fastzoo.ops.weight_only_linear import MAX_KERNEL_ROWS, norm_options, rms_norm_ref, silu_mul_ref

from .config import LlamaConfig


def rope_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse RoPE frequencies (fp32, ``head_dim // 2``), with the configured scaling."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (
        torch.arange(0, hd, 2, dtype=torch.int64, device=device).to(torch.float32) / hd))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    if rs["rope_type"] == "linear":
        return inv_freq / float(rs["factor"])
    # Llama 3.1: leave high frequencies, divide low ones by `factor`, interpolate in between.
    factor = float(rs["factor"])
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", config.max_position_embeddings))
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(config: LlamaConfig, input_pos: torch.Tensor):
    """cos, sin of shape ``[B, T, 1, head_dim]`` (fp32) for positions ``input_pos [B, T]``."""
    return _cos_sin(input_pos, rope_inv_freq(config, input_pos.device))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 normalisation, rounded to x's dtype, times the weight
        return rms_norm_ref(x, self.weight, self.eps)


def fused_linear(module: nn.Module, x: torch.Tensor, *, norm: RMSNorm | None = None, glu: bool = False,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + module(norm(silu(a) · b))`` for x = [a | b] (each part optional: ``glu``
    splits x's last dim in halves; ``norm`` an :class:`RMSNorm`; ``residual`` of the output's
    shape). A linear module may implement ``fused_forward(x, *, norm, glu, residual)`` (one
    kernel on CUDA: :class:`Linear`, ``fastzoo.quant.Int8WeightOnlyLinear``; int4 / GPTQ's
    ``Int4WeightOnlyLinear`` for one row on Hopper, where its ``fuses(x, norm)`` says so), used
    for decode-sized inputs (at most ``MAX_KERNEL_ROWS`` rows, the kernels' regime).
    Composed here in plain PyTorch: any other module (sparse, …), a module with forward
    hooks (they observe the plain input: GPTQ's Hessians, calibration), and more rows
    (prefill: inductor fuses the norm and SwiGLU, the product is a cuBLAS GEMM)."""
    fused = getattr(module, "fused_forward", None)
    fuses = getattr(module, "fuses", None)
    if (fused is not None and x.shape[:-1].numel() <= MAX_KERNEL_ROWS
            and not (module._forward_hooks or module._forward_pre_hooks) and (fuses is None or fuses(x, norm))):
        return fused(x, norm=norm, glu=glu, residual=residual)
    if glu:
        x = silu_mul_ref(x)
    if norm is not None:
        x = norm(x)
    y = module(x)
    return y if residual is None else residual + y


class KVCache(nn.Module):
    """Static cache ``[max_batch, n_kv_heads, max_seq, head_dim]`` for keys and values, in
    ``dtype`` (the model's; :class:`Int8KVCache`: int8 with scales); written and read by
    :func:`fastzoo.ops.decode_attention`."""

    def __init__(self, max_batch_size, max_seq_length, n_kv_heads, head_dim, inv_freq: torch.Tensor, dtype,
                 device=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # the model's RoPE frequencies (rope_inv_freq), a buffer: under torch.compile each
        # layer's op reads it instead of a cos/sin table recomputed per layer
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def attend(self, q, k, v, input_pos, kv_len: int) -> torch.Tensor:
        """RoPE, write k, v at slots ``input_pos [B, T]`` and attend over the first ``kv_len``
        slots (:func:`fastzoo.ops.decode_attention`: a fused kernel for one token on CUDA)."""
        return ops.decode_attention(q, k, v, self.inv_freq, input_pos, self.k_cache, self.v_cache, kv_len)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose products go through
    :func:`fastzoo.ops.decode_linear`: a bandwidth-bound Triton GEMV for the few rows of a
    decode step on a CUDA GPU, ``F.linear`` (cuBLAS, or the CPU) for everything else.
    ``fastzoo.quant.quantize_`` swaps it like any ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.decode_linear(x, self.weight, self.bias)

    def fused_forward(self, x: torch.Tensor, *, norm: RMSNorm | None = None, glu: bool = False,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`fused_linear`'s protocol: norm, SwiGLU and residual in the decode kernel."""
        return ops.decode_linear(x, self.weight, self.bias, glu=glu, residual=residual, **norm_options(norm))


class Int8KVCache(KVCache):
    """:class:`KVCache` in int8 with one fp32 scale per (token, head): ``x ≈ q · scale``,
    symmetric, ``scale = max|x| / 127`` over ``head_dim`` (``fastzoo.ops.quantize_rows_int8_ref``).
    Written and read by :func:`fastzoo.ops.decode_attention` with the scales (a fused kernel for
    one token on CUDA that reads the int8 tiles and applies each slot's scale to its score and
    softmax weight)."""

    quantize = staticmethod(quantize_rows_int8_ref)  # ``x [..., hd]`` → (int8 values, fp32 scales ``[..., 1]``)

    def __init__(self, max_batch_size, max_seq_length, n_kv_heads, head_dim, inv_freq: torch.Tensor, device=None):
        super().__init__(max_batch_size, max_seq_length, n_kv_heads, head_dim, inv_freq, torch.int8, device)
        scales = (max_batch_size, n_kv_heads, max_seq_length, 1)
        self.register_buffer("k_scales", torch.ones(scales, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("v_scales", torch.ones(scales, dtype=torch.float32, device=device), persistent=False)

    def attend(self, q, k, v, input_pos, kv_len: int) -> torch.Tensor:
        """As :meth:`KVCache.attend`: k and v quantized per slot, attention over the dequantized slots."""
        return ops.decode_attention(q, k, v, self.inv_freq, input_pos, self.k_cache, self.v_cache, kv_len,
                                    self.k_scales, self.v_scales)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv_heads * self.head_dim
        self.wqkv = Linear(config.dim, q_size + 2 * kv_size, bias=False)
        self.wo = Linear(q_size, config.dim, bias=False)
        self.kv_cache: KVCache | None = None  # or an Int8KVCache

    def forward(self, x, cos, sin, input_pos, mask, *, norm: RMSNorm | None = None,
                residual: torch.Tensor | None = None):
        """Attention of ``norm(x)`` (``norm`` fused into ``wqkv``), plus ``residual`` (fused into ``wo``)."""
        B, T, _ = x.shape
        q_size = self.n_heads * self.head_dim
        kv_size = self.n_kv_heads * self.head_dim
        q, k, v = fused_linear(self.wqkv, x, norm=norm).split([q_size, kv_size, kv_size], dim=-1)
        if isinstance(self.kv_cache, KVCache):  # RoPE, cache write and attention in one op (int8 too)
            q = q.view(B, T, self.n_heads, self.head_dim)
            k = k.view(B, T, self.n_kv_heads, self.head_dim)
            v = v.view(B, T, self.n_kv_heads, self.head_dim)
            y = self.kv_cache.attend(q, k, v, input_pos, mask.shape[-1])
            return fused_linear(self.wo, y, residual=residual)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.n_kv_heads != self.n_heads:  # query head h uses kv head h // rep (no host sync)
            rep = self.n_heads // self.n_kv_heads
            Bk, Hk, S, D = k.shape
            k = k[:, :, None].expand(Bk, Hk, rep, S, D).reshape(Bk, Hk * rep, S, D)
            v = v[:, :, None].expand(Bk, Hk, rep, S, D).reshape(Bk, Hk * rep, S, D)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, q_size)
        return fused_linear(self.wo, y, residual=residual)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.w13 = Linear(config.dim, 2 * config.intermediate_size, bias=False)
        self.w2 = Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x, *, norm: RMSNorm | None = None, residual: torch.Tensor | None = None):
        """SwiGLU MLP of ``norm(x)`` (fused into ``w13``) plus ``residual``; silu(x1)·x3 and
        the residual fused into ``w2``."""
        return fused_linear(self.w2, fused_linear(self.w13, x, norm=norm), glu=True, residual=residual)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, input_pos, mask):
        h = self.attention(x, cos, sin, input_pos, mask, norm=self.attention_norm, residual=x)
        return self.feed_forward(h, norm=self.ffn_norm, residual=h)


class Transformer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        self.max_batch_size = 0
        self.max_seq_length = 0

    # ------------------------------------------------------------------ caches
    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype=None, device=None,
                     kv_cache_dtype: torch.dtype | None = None):
        """Allocate a static KV cache per layer (zeros) of ``max_batch_size × max_seq_length``.

        ``kv_cache_dtype=torch.int8``: int8 keys/values with per-token, per-head scales
        (:class:`Int8KVCache`); otherwise the cache is stored in ``dtype``.
        """
        if kv_cache_dtype not in (None, torch.int8):
            raise ValueError(f"kv_cache_dtype must be None or torch.int8, got {kv_cache_dtype}")
        w = self.tok_embeddings.weight
        dtype = dtype or (w.dtype if w.dtype.is_floating_point else torch.bfloat16)
        device = device or w.device
        if max_seq_length > self.config.max_position_embeddings:
            raise ValueError(f"max_seq_length {max_seq_length} exceeds the model's "
                             f"max_position_embeddings {self.config.max_position_embeddings}")
        inv_freq = rope_inv_freq(self.config, device)
        for layer in self.layers:
            if kv_cache_dtype == torch.int8:
                layer.attention.kv_cache = Int8KVCache(max_batch_size, max_seq_length, self.config.n_kv_heads,
                                                       self.config.head_dim, inv_freq, device)
                continue
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, self.config.n_kv_heads,
                                               self.config.head_dim, inv_freq, dtype, device)
        self.max_batch_size = max_batch_size
        self.max_seq_length = max_seq_length

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.max_batch_size = self.max_seq_length = 0

    @property
    def has_caches(self) -> bool:
        return self.max_seq_length > 0

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, *,
                kv_len: int | None = None, logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for ``tokens [B, T]``.

        input_pos: positions ``[B, T]`` (or ``[T]``, shared); default ``0..T-1``.  With caches
            set up, the keys/values are written at these cache slots and the query at
            position ``p`` attends to slots ``0..p`` of its own sequence.
        kv_len: with caches, attend only over the first ``kv_len`` slots (a static number
            ≥ every position + 1; default all ``max_seq_length`` slots).
        logits_at: ``[B]`` index along T; if given, only those rows are projected to the
            vocabulary and the result is ``[B, V]``.
        """
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device)
        if input_pos.dim() == 1:
            input_pos = input_pos[None, :].expand(B, T)
        # layers with a cache apply RoPE inside their attention op: the cos/sin table is built
        # only where some layer (no cache) applies it itself
        cos = sin = None
        if not all(isinstance(layer.attention.kv_cache, KVCache) for layer in self.layers):
            cos, sin = rope_cos_sin(self.config, input_pos)
        if self.has_caches:
            if B > self.max_batch_size:
                raise ValueError(f"batch {B} exceeds the cache's max_batch_size {self.max_batch_size}")
            kv_len = kv_len or self.max_seq_length
            if kv_len > self.max_seq_length:
                raise ValueError(f"kv_len {kv_len} exceeds the cache's max_seq_length {self.max_seq_length}")
            slots = torch.arange(kv_len, device=tokens.device)
            mask = (slots[None, None, :] <= input_pos[:, :, None])[:, None]  # [B, 1, T, kv_len]
        else:
            mask = None  # plain causal attention over the given tokens
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at]
        return fused_linear(self.output, x, norm=self.norm)

    # ------------------------------------------------------------------ helpers
    def weight_bytes(self) -> int:
        """Bytes one decode step reads: all parameters and weight buffers (quantized weights,
        scales) except the embedding table, of which a step reads one row per sequence; the
        KV cache is not counted."""
        tensors = [t for n, t in self.named_parameters() if not n.startswith("tok_embeddings.")]
        tensors += [t for n, t in self.named_buffers() if ".kv_cache." not in n]
        return sum(t.numel() * t.element_size() for t in tensors)
