"""fastzoo's checkpoint format and weight-name mapping.

A fastzoo Llama checkpoint is a directory with

* ``model.pth``: ``torch.save`` of a state dict whose keys are exactly the keys of
  :class:`fastzoo.llama.model.Transformer` (fused ``wqkv`` / ``w13``, rotate-half RoPE
  layout as in Hugging Face checkpoints);
* ``config.json``: Hugging Face ``config.json`` fields;
* ``tokenizer.model``: SentencePiece model or tiktoken BPE file.

Loading builds the model on the meta device and assigns the memory-mapped tensors, so the
weights are never held twice in memory.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from fastzoo.checkpoint import CheckpointError, read_state_dict
from fastzoo.checkpoint import check_state_dict as _check_state_dict
from fastzoo.utils import parse_dtype as _parse_dtype

from .config import LlamaConfig, LlamaError
from .model import Transformer

WEIGHTS_NAME = "model.pth"
CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.model"

QUANT_FIELD = "fastzoo_quantization"  # config.json field recording a quantized checkpoint's format


QUANT_MODES = ("int8", "int4")


def quant_config_for(mode: str, group_size: int | None = None):
    """The ``fastzoo.quant`` config of a checkpoint mode: ``int8`` (per channel) or ``int4``
    with ``group_size`` (default 128); GPTQ checkpoints have int4's layout."""
    from fastzoo.quant import INT4_GROUP_SIZES, Int4WeightOnly, Int8WeightOnly
    if mode == "int8":
        if group_size is not None:
            raise LlamaError("--group-size applies to int4 only (int8 is per output channel)")
        return Int8WeightOnly()
    if mode == "int4":
        g = 128 if group_size is None else group_size
        if g not in INT4_GROUP_SIZES:
            raise LlamaError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {g}")
        return Int4WeightOnly(g)
    raise LlamaError(f"unknown quantization mode {mode!r}; expected one of {', '.join(QUANT_MODES)}")


def quantization_of(config: LlamaConfig):
    """The ``fastzoo.quant`` config that builds a checkpoint's quantized modules, or None.

    Read from the ``fastzoo_quantization`` field of its config.json (written by
    :mod:`fastzoo.llama.quantize`): ``{"mode": "int8"}`` or ``{"mode": "int4", "group_size": N}``.
    """
    rec = config.extra.get(QUANT_FIELD)
    if rec is None:
        return None
    if not isinstance(rec, dict):
        raise LlamaError(f"config field {QUANT_FIELD!r} must be an object, found {rec!r}")
    try:
        return quant_config_for(rec.get("mode"), rec.get("group_size") if rec.get("mode") == "int4" else None)
    except LlamaError as e:
        raise LlamaError(f"config field {QUANT_FIELD!r} ({rec}): {e}") from None


def parse_dtype(name) -> torch.dtype:
    """``fastzoo.utils.parse_dtype`` with errors as :class:`LlamaError`."""
    return _parse_dtype(name, error=LlamaError)


# ---------------------------------------------------------------------------- HF names
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_LAYER_MAP = {
    "self_attn.q_proj.weight": ("attention.wqkv.weight", 0),
    "self_attn.k_proj.weight": ("attention.wqkv.weight", 1),
    "self_attn.v_proj.weight": ("attention.wqkv.weight", 2),
    "self_attn.o_proj.weight": ("attention.wo.weight", None),
    "mlp.gate_proj.weight": ("feed_forward.w13.weight", 0),
    "mlp.up_proj.weight": ("feed_forward.w13.weight", 1),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", None),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
_HF_TOP_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_FUSED_PARTS = {"attention.wqkv.weight": 3, "feed_forward.w13.weight": 2}


def map_hf_key(key: str):
    """HF key → (fastzoo key, part index for fused tensors or None); None to skip the key."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    if key in _HF_TOP_MAP:
        return _HF_TOP_MAP[key], None
    m = _HF_LAYER.match(key)
    if m and m.group(2) in _HF_LAYER_MAP:
        name, part = _HF_LAYER_MAP[m.group(2)]
        return f"layers.{m.group(1)}.{name}", part
    raise LlamaError(f"unexpected tensor {key!r} in the Hugging Face checkpoint")


class FusingStateDict:
    """Collects (key, part, tensor) triples and fuses the parts of ``wqkv`` / ``w13``."""

    def __init__(self):
        self.sd: dict[str, torch.Tensor] = {}
        self._parts: dict[str, dict[int, torch.Tensor]] = {}

    def add(self, key: str, part, tensor: torch.Tensor):
        if part is None:
            if key in self.sd:
                raise LlamaError(f"tensor {key!r} appears twice in the checkpoint")
            self.sd[key] = tensor
            return
        parts = self._parts.setdefault(key, {})
        parts[part] = tensor
        n = _FUSED_PARTS[key.split(".", 2)[2]]
        if len(parts) == n:
            self.sd[key] = torch.cat([parts[i] for i in range(n)], dim=0)
            del self._parts[key]

    def finish(self, config: LlamaConfig) -> dict[str, torch.Tensor]:
        if self._parts:
            key = next(iter(self._parts))
            raise LlamaError(f"incomplete fused tensor {key!r}: only parts {sorted(self._parts[key])} found")
        if "output.weight" not in self.sd and "tok_embeddings.weight" in self.sd:
            if not config.tie_word_embeddings:
                raise LlamaError("checkpoint has no output (lm_head) weight and tie_word_embeddings is false")
            self.sd["output.weight"] = self.sd["tok_embeddings.weight"].clone()
        return self.sd


# ---------------------------------------------------------------------------- Meta layout
def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE rows (pairs) → HF's rotate-half rows, per head."""
    out, inp = w.shape
    hd = out // n_heads
    return w.view(n_heads, hd // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_meta_to_hf`."""
    out, inp = w.shape
    hd = out // n_heads
    return w.view(n_heads, 2, hd // 2, inp).transpose(1, 2).reshape(out, inp)


# ---------------------------------------------------------------------------- loading
def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str = "checkpoint"):
    """Raise LlamaError naming the missing / unexpected / mis-shaped tensors."""
    try:
        _check_state_dict(model, sd, where)
    except CheckpointError as e:
        raise LlamaError(str(e)) from None


def load_model(checkpoint_dir, device="cpu", dtype=None) -> Transformer:
    """Load a fastzoo checkpoint directory into an eval-mode :class:`Transformer`."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise LlamaError(f"checkpoint directory not found: {d}")
    wpath = d / WEIGHTS_NAME
    if not wpath.is_file():
        raise LlamaError(f"weights not found: {wpath} (convert a checkpoint with python -m fastzoo.llama.convert)")
    config = LlamaConfig.from_json(d / CONFIG_NAME)
    qconfig = quantization_of(config)
    with torch.device("meta"):
        model = Transformer(config)
        if qconfig is not None:  # the recorded quantization, never the file name
            from fastzoo.quant import quantize_
            quantize_(model, qconfig)
    try:
        sd = read_state_dict(wpath)
    except CheckpointError as e:
        raise LlamaError(str(e)) from None
    hint = f"(config.json records the quantization {qconfig.name})" if qconfig is not None else None
    try:
        _check_state_dict(model, sd, str(wpath), hint=hint)
    except CheckpointError as e:
        raise LlamaError(str(e)) from None
    model.load_state_dict(sd, strict=True, assign=True)
    dtype = parse_dtype(dtype) if dtype is not None else None
    model.to(device=device, dtype=dtype)
    return model.eval()


def write_checkpoint_dir(out_dir, sd: dict[str, torch.Tensor], config: LlamaConfig, tokenizer_path=None) -> Path:
    """Write a checkpoint directory atomically: into a temporary directory next to
    ``out_dir``, renamed at the end (replacing ``out_dir`` if it exists); nothing is left
    behind on failure."""
    import shutil
    import tempfile
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        torch.save({k: v.contiguous() for k, v in sd.items()}, tmp / WEIGHTS_NAME)
        config.to_json(tmp / CONFIG_NAME)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_NAME)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_checkpoint(model_or_sd, config: LlamaConfig, out_dir, tokenizer_path=None):
    """Write a fastzoo checkpoint (used by tests and :mod:`fastzoo.llama.convert`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else model_or_sd
    torch.save({k: v.contiguous() for k, v in sd.items()}, out / WEIGHTS_NAME)
    config.to_json(out / CONFIG_NAME)
    if tokenizer_path is not None:
        import shutil
        shutil.copyfile(tokenizer_path, out / TOKENIZER_NAME)
    return out


def resolve_run_args(checkpoint: Path, device: str | None, dtype: str | None, tokenizer: Path | None = None):
    """The CLIs' common set-up: ``(device, dtype, tokenizer path)``.

    ``device`` defaults to CUDA when available (an explicit ``cuda`` without a GPU is an
    error); ``dtype`` to bf16 on CUDA and fp32 on the CPU; the tokenizer to
    ``CHECKPOINT/tokenizer.model``, which must exist.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LlamaError("--device cuda requested but no CUDA GPU is available")
    dt = parse_dtype(dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    tok_path = Path(tokenizer or Path(checkpoint) / TOKENIZER_NAME)
    if not tok_path.is_file():
        raise LlamaError(f"tokenizer file not found: {tok_path}")
    return dev, dt, tok_path
