"""Llama-family model configuration.

The configuration is always read from a JSON file with the fields of a Hugging Face
``config.json`` (``hidden_size``, ``num_hidden_layers``, ...); nothing is ever inferred
from a file or directory name.  Named presets are just stored configuration values.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class LlamaError(ValueError):
    """A user-facing error (bad checkpoint, bad configuration, bad arguments)."""


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
#: config.json fields kept in ``LlamaConfig.extra`` and written back unchanged
#: (``fastzoo_quantization``: how a quantized checkpoint's weights are stored, see fastzoo.llama.quantize).
CARRIED_FIELDS = ("sliding_window", "fastzoo_quantization")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    intermediate_size: int = 11008
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style scaling dict without rope_theta, e.g.
    # {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    #  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    torch_dtype: str | None = None
    extra: dict = field(default_factory=dict)  # other HF fields, carried through unchanged

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise LlamaError(f"hidden_size {self.dim} is not divisible by num_attention_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise LlamaError(
                f"num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise LlamaError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            rs = dict(self.rope_scaling)
            rtype = rs.get("rope_type", rs.get("type", "default"))
            if rtype not in SUPPORTED_ROPE_TYPES:
                raise LlamaError(f"unsupported RoPE scaling type {rtype!r} (supported: {SUPPORTED_ROPE_TYPES})")
            rs.pop("type", None)
            rs["rope_type"] = rtype
            rs.pop("rope_theta", None)
            self.rope_scaling = None if rtype == "default" else rs

    # ------------------------------------------------------------------ HF fields
    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> "LlamaConfig":
        d = dict(d)
        try:
            dim = int(d.pop("hidden_size"))
            n_layers = int(d.pop("num_hidden_layers"))
            n_heads = int(d.pop("num_attention_heads"))
            inter = int(d.pop("intermediate_size"))
            vocab = int(d.pop("vocab_size"))
        except KeyError as e:
            raise LlamaError(f"config is missing the field {e.args[0]!r}") from None
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise LlamaError("attention_bias / mlp_bias are not supported")
        act = d.pop("hidden_act", "silu")
        if act != "silu":
            raise LlamaError(f"unsupported hidden_act {act!r} (only 'silu')")
        rope_params = d.pop("rope_parameters", None)  # transformers >= 5
        rope_scaling = d.pop("rope_scaling", None)
        rope_theta = d.pop("rope_theta", None)
        if rope_params is not None:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        return cls(
            vocab_size=vocab,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=d.pop("num_key_value_heads", None),
            intermediate_size=inter,
            head_dim=d.pop("head_dim", None),
            norm_eps=float(d.pop("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.pop("max_position_embeddings", 4096)),
            bos_token_id=d.pop("bos_token_id", None),
            eos_token_id=d.pop("eos_token_id", None),
            tie_word_embeddings=bool(d.pop("tie_word_embeddings", False)),
            model_type=d.pop("model_type", "llama"),
            torch_dtype=d.pop("torch_dtype", None) or d.pop("dtype", None),
            extra={k: v for k, v in d.items() if k in CARRIED_FIELDS and v is not None},
        )

    def to_hf_config(self) -> dict[str, Any]:
        d = {
            "architectures": ["LlamaForCausalLM"] if self.model_type == "llama" else ["MistralForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": copy.deepcopy(self.rope_scaling),
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
        }
        if self.torch_dtype is not None:
            d["torch_dtype"] = self.torch_dtype
        d.update(copy.deepcopy(self.extra))
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise LlamaError(f"config file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LlamaError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_config(d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_config(), indent=2) + "\n")

    @classmethod
    def from_preset(cls, name: str) -> "LlamaConfig":
        key = name.lower()
        if key not in PRESETS:
            raise LlamaError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls.from_hf_config(PRESETS[key])

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return [int(x) for x in e] if isinstance(e, (list, tuple)) else [int(e)]

    def asdict(self) -> dict:
        return asdict(self)


def _hf(dim, layers, heads, kv, inter, vocab, *, theta=10000.0, max_pos=4096, eps=1e-5, bos=1, eos=2,
        scaling=None, model_type="llama", tie=False):
    return {
        "hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab,
        "rope_theta": theta, "max_position_embeddings": max_pos, "rms_norm_eps": eps,
        "bos_token_id": bos, "eos_token_id": eos, "rope_scaling": scaling, "model_type": model_type,
        "tie_word_embeddings": tie,
    }


_LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}

#: Named presets: HF config.json values of the published models (random-weight benchmarks, tests).
PRESETS: dict[str, dict] = {
    "llama-2-7b": _hf(4096, 32, 32, 32, 11008, 32000),
    "llama-2-13b": _hf(5120, 40, 40, 40, 13824, 32000),
    "llama-2-70b": _hf(8192, 80, 64, 8, 28672, 32000),
    "llama-3-8b": _hf(4096, 32, 32, 8, 14336, 128256, theta=500000.0, max_pos=8192, bos=128000, eos=128001),
    "llama-3-70b": _hf(8192, 80, 64, 8, 28672, 128256, theta=500000.0, max_pos=8192, bos=128000, eos=128001),
    "llama-3.1-8b": _hf(4096, 32, 32, 8, 14336, 128256, theta=500000.0, max_pos=131072, bos=128000,
                        eos=128001, scaling=_LLAMA31_SCALING),
    "llama-3.1-70b": _hf(8192, 80, 64, 8, 28672, 128256, theta=500000.0, max_pos=131072, bos=128000,
                         eos=128001, scaling=_LLAMA31_SCALING),
    # Mistral-7B v0.1 (its 4096-token sliding window is not implemented: exact up to 4096 tokens)
    "mistral-7b": _hf(4096, 32, 32, 8, 14336, 32000, max_pos=32768, model_type="mistral"),
    "codellama-7b": _hf(4096, 32, 32, 32, 11008, 32016, theta=1000000.0, max_pos=16384),
    "codellama-34b": _hf(8192, 48, 64, 8, 22016, 32000, theta=1000000.0, max_pos=16384),
    # Karpathy's TinyStories models (llama2.c)
    "stories15m": _hf(288, 6, 6, 6, 768, 32000, max_pos=256),
    "stories42m": _hf(512, 8, 8, 8, 1376, 32000, max_pos=1024),
    "stories110m": _hf(768, 12, 12, 12, 2048, 32000, max_pos=1024),
    # very small, for tests and CPU smoke runs (widths int4 groups of 32 and 64 divide)
    "tiny": _hf(64, 2, 4, 2, 256, 512, max_pos=512),
}

#: Presets small enough to run on a CPU.
TINY_PRESETS = ("tiny", "stories15m", "stories42m", "stories110m")
