"""``quantize_(model, config)``: swap a model's linear layers for quantized ones, in place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .calibrate import OBSERVERS, make_observer, observe
from .linear import INT4_GROUP_SIZES, Int4WeightOnlyLinear, Int8DynamicLinear, Int8StaticLinear, Int8WeightOnlyLinear
from .sparse import Int8DynamicSparse24Linear, Sparse24Linear

ATTENTIONS = ("sdpa", "int8")


@dataclass(frozen=True)
class QuantConfig:
    """Base class: a config knows its CLI name and how to quantize one ``nn.Linear``;
    ``needs_calibration``: it quantizes from statistics of calibration batches."""

    needs_calibration = False  # a class attribute, not a dataclass field

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
    """int8 weights (per channel) and int8 activations quantized per token at run time (W8A8).

    ``attention="int8"``: where a model's attention can be swapped (the fastzoo ViT, via
    ``fastzoo.quant.quantize_vit_``), q, k, v are quantized per token and head and run through
    the mixed-precision ``int8_attention`` kernel; ``"sdpa"`` keeps bf16 SDPA.
    """

    attention: str = "sdpa"

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"Int8Dynamic attention must be one of {ATTENTIONS}, got {self.attention!r}")

    @property
    def name(self) -> str:
        return "int8dq" + ("-qattn" if self.attention == "int8" else "")

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
class Int8Static(QuantConfig):
    """int8 weights and int8 activations with scales calibrated on sample batches (static W8A8).

    ``observer``: ``"minmax"`` (largest |activation| seen) or ``"percentile"`` (the
    ``percentile``-th percentile of |activation| per batch, averaged); activations are
    per tensor (one scale per layer input, what a static int8 GEMM epilogue can apply).
    ``weight``: ``"channel"`` (one scale per output channel) or ``"tensor"``.
    ``attention``: ``"int8"`` runs the ViT attention in the mixed-precision kernel on the
    int8 q, k, v the qkv GEMM writes (static per-tensor scales), ``"sdpa"`` keeps bf16.
    Needs calibration: ``quantize_(model, Int8Static(), calibration=batches)``.
    """

    observer: str = "minmax"
    percentile: float = 99.99
    weight: str = "channel"
    attention: str = "sdpa"

    def __post_init__(self):
        if self.observer not in OBSERVERS:
            raise ValueError(f"Int8Static observer must be one of {list(OBSERVERS)}, got {self.observer!r}")
        if self.weight not in ("channel", "tensor"):
            raise ValueError(f"Int8Static weight must be 'channel' or 'tensor', got {self.weight!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"Int8Static attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"Int8Static percentile must be in (0, 100], got {self.percentile}")

    @property
    def name(self) -> str:
        return "int8static" + ("-qattn" if self.attention == "int8" else "")

    needs_calibration = True

    def observer_for(self, per_channel: bool = False):
        return make_observer(self.observer, per_channel, self.percentile)

    def quantize_linear(self, linear: nn.Linear, in_scale=None, out_scale=None) -> nn.Module:
        if in_scale is None:
            raise ValueError("Int8Static needs the calibrated input scale of each linear: call "
                             "quantize_(model, Int8Static(...), calibration=batches)")
        return Int8StaticLinear.from_linear(linear, in_scale, self.weight == "channel", out_scale)




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
# W8A8 configs with an attention option or calibration (ViT / SAM image encoders).
ACTIVATION_CONFIGS: dict[str, QuantConfig] = {
    c.name: c for c in [Int8Dynamic(), Int8Dynamic(attention="int8"), Int8Static(), Int8Static(attention="int8")]
}


def config_from_string(name: str) -> QuantConfig:
    """Exact-match lookup of a CLI string (``int8``, ``int8dq``, ``int4-g128``, ``int8static``, …)."""
    table = {**CONFIGS, **ACTIVATION_CONFIGS}
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown quantization {name!r}; valid: {', '.join(table)}") from None


FilterFn = Callable[[nn.Module, str], bool]


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear)


def as_config(config: QuantConfig | str) -> QuantConfig:
    if isinstance(config, str):
        config = config_from_string(config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_ expects a QuantConfig or one of {list(CONFIGS) + list(ACTIVATION_CONFIGS)}, "
                        f"got {type(config).__name__}")
    return config


def quantize_(model: nn.Module, config: QuantConfig | str, filter_fn: FilterFn | None = None, *,
              calibration=None) -> nn.Module:
    """Replace, in place, every submodule for which ``filter_fn(module, fqn)`` is true
    (default: every ``nn.Linear``) by ``config``'s quantized module. Returns ``model``.

    ``config`` may be a config object or its CLI string. Works on the meta device,
    so a quantized checkpoint can be loaded with ``load_state_dict(..., assign=True)``
    into a model built on meta and quantized first (not for ``Int8Static``, which needs
    calibration here; a static ViT uses ``quantize_vit_(..., for_loading=True)``).

    ``calibration``: for ``Int8Static`` and ``GPTQ``, an iterable of model inputs (tensors,
    or tuples of positional arguments): ``model(*batch)`` runs on each, in float, and the
    observers record every selected linear's input range (``Int8Static``) or its Hessian
    ``2 X Xᵀ`` (``GPTQ``: all in one pass, every Hessian held at once; for a Llama model
    ``fastzoo.llama.quantize.gptq_quantize_llama_`` goes layer by layer instead, each
    layer's Hessians from the already-quantized layers' outputs) before the swap.
    """
    config = as_config(config)
    if config.needs_calibration and calibration is None:
        raise ValueError(f"{config.name} needs calibration batches: quantize_(model, config, calibration=batches)")
    if hasattr(config, "quantize_model_"):  # configs that quantize from statistics of the whole model
        config.quantize_model_(model, calibration, filter_fn)
        return model
    targets = select_linears(model, filter_fn)
    extra: dict[str, dict] = {fqn: {} for fqn, _ in targets}
    if config.needs_calibration:
        observers = {fqn: config.observer_for() for fqn, _ in targets}
        observe(model, calibration, inputs=observers)
        extra = {fqn: {"in_scale": obs.scale()} for fqn, obs in observers.items()}
    for fqn, module in targets:
        swap_linear(model, fqn, config, lambda module=module, fqn=fqn: config.quantize_linear(module, **extra[fqn]))
    return model


def select_linears(model: nn.Module, filter_fn: FilterFn | None = None) -> list[tuple[str, nn.Module]]:
    """``(fqn, module)`` of the submodules ``filter_fn`` selects (default: every ``nn.Linear``);
    anything selected that is not an ``nn.Linear`` is an error."""
    filter_fn = filter_fn or _default_filter
    targets = [(fqn, m) for fqn, m in model.named_modules() if fqn and filter_fn(m, fqn)]
    for fqn, module in targets:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"filter_fn selected {fqn!r}, a {type(module).__name__}; only nn.Linear can be quantized")
    return targets


def swap_linear(model: nn.Module, fqn: str, config: QuantConfig, make: Callable[[], nn.Module]) -> None:
    """Replace ``model``'s submodule ``fqn`` by ``make()``; a ``ValueError`` names the module and config."""
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    try:
        setattr(parent, child, make())
    except ValueError as e:
        raise ValueError(f"cannot quantize {fqn!r} with {config.name}: {e}") from None
