"""``quantize_(model, config)``: swap a model's linear layers for quantized ones, in place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .linear import INT4_GROUP_SIZES, Int4WeightOnlyLinear, Int8DynamicLinear, Int8WeightOnlyLinear
from .sparse import Int8DynamicSparse24Linear, Sparse24Linear


@dataclass(frozen=True)
class QuantConfig:
    """Base class: a config knows its CLI name and how to quantize one ``nn.Linear``."""

    @property
    def name(self) -> str:
        raise NotImplementedError

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError


@dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """int8 weights with per-output-channel scales; activations in float (W8A16)."""

    @property
    def name(self) -> str:
        return "int8"

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        return Int8WeightOnlyLinear.from_linear(linear)


@dataclass(frozen=True)
class Int8Dynamic(QuantConfig):
    """int8 weights (per channel) and int8 activations quantized per token at run time (W8A8)."""

    @property
    def name(self) -> str:
        return "int8dq"

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        return Int8DynamicLinear.from_linear(linear)


@dataclass(frozen=True)
class Sparse24(QuantConfig):
    """2:4 magnitude pruning along K; semi-structured sparse matmul on CUDA fp16/bf16, dense elsewhere."""

    @property
    def name(self) -> str:
        return "sparse24"

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        return Sparse24Linear.from_linear(linear)


@dataclass(frozen=True)
class Int8DynamicSparse24(QuantConfig):
    """2:4 pruning, then ``Int8Dynamic`` on the pruned weight (int8 2:4 cuSPARSELt matmul on CUDA)."""

    @property
    def name(self) -> str:
        return "int8dq-sparse24"

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        return Int8DynamicSparse24Linear.from_linear(linear)


@dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """Asymmetric group-wise int4 weights (scales and zeros per group); activations in float (W4A16)."""

    group_size: int = 128

    def __post_init__(self):
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"Int4WeightOnly group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")

    @property
    def name(self) -> str:
        return f"int4-g{self.group_size}"

    def quantize_linear(self, linear: nn.Linear) -> nn.Module:
        return Int4WeightOnlyLinear.from_linear(linear, self.group_size)


CONFIGS: dict[str, QuantConfig] = {
    c.name: c for c in [Int8WeightOnly(), Int8Dynamic(), *(Int4WeightOnly(g) for g in INT4_GROUP_SIZES),
                        Sparse24(), Int8DynamicSparse24()]
}


def config_from_string(name: str) -> QuantConfig:
    """Exact-match lookup of a CLI string (``int8``, ``int8dq``, ``int4-g128``, …)."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown quantization {name!r}; valid: {', '.join(CONFIGS)}") from None


FilterFn = Callable[[nn.Module, str], bool]


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def quantize_(model: nn.Module, config: QuantConfig | str, filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace, in place, every submodule for which ``filter_fn(module, fqn)`` is true
    (default: every ``nn.Linear``) by ``config``'s quantized module. Returns ``model``.

    ``config`` may be a config object or its CLI string. Works on the meta device,
    so a quantized checkpoint can be loaded with ``load_state_dict(..., assign=True)``
    into a model built on meta and quantized first.
    """
    if isinstance(config, str):
        config = config_from_string(config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_ expects a QuantConfig or one of {list(CONFIGS)}, got {type(config).__name__}")
    filter_fn = filter_fn or _default_filter
    targets = [(fqn, m) for fqn, m in model.named_modules() if fqn and filter_fn(m, fqn)]
    for fqn, module in targets:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"filter_fn selected {fqn!r}, a {type(module).__name__}; only nn.Linear can be quantized")
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            setattr(parent, child, config.quantize_linear(module))
        except ValueError as e:
            raise ValueError(f"cannot quantize {fqn!r} with {config.name}: {e}") from None
    return model
