"""Observers and calibration for static int8 quantization.

An observer sees tensors (activations during calibration batches, or a weight once)
and gives a symmetric int8 scale ``absmax / 127``:

- ``MinMaxObserver``: the largest |value| seen (over every batch);
- ``PercentileObserver``: the ``percentile``-th percentile of |value| of each batch,
  averaged over batches (clips rare outliers; 99.99 by default);

each per tensor (one scale) or per channel (``per_channel=True``: one scale per index
of the last dimension).

``observe(model, batches, inputs={...}, outputs={...})`` runs ``model(batch)`` under
``torch.no_grad`` for each calibration batch with forward hooks on the named modules and
returns their observers: the statistics static int8 modules are built from.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Callable, Iterable

import torch
from torch import nn

from fastzoo.ops.quantize_rows import EPS

# At most this many values per batch go into a percentile (torch.quantile's limit is 2^24).
_PERCENTILE_SAMPLE = 1 << 20


class Observer:
    def __init__(self, per_channel: bool = False):
        self.per_channel = per_channel
        self.amax: torch.Tensor | None = None
        self.batches = 0

    def _stat(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _merge(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs()
        a = a.reshape(-1, a.shape[-1]) if self.per_channel else a.reshape(-1, 1)
        stat = self._stat(a)
        self.amax = stat if self.amax is None else self._merge(self.amax, stat)
        self.batches += 1

    def scale(self) -> torch.Tensor:
        """float32 scales: (channels,) per channel, (1,) per tensor."""
        if self.amax is None:
            raise RuntimeError("observer saw no data: did the calibration batches run through this module?")
        return (torch.clamp(self.amax, min=EPS) / 127.0).float().reshape(-1)


class MinMaxObserver(Observer):
    def _stat(self, a):
        return a.amax(dim=0)

    def _merge(self, old, new):
        return torch.maximum(old, new)


class PercentileObserver(Observer):
    def __init__(self, per_channel: bool = False, percentile: float = 99.99):
        super().__init__(per_channel)
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def _stat(self, a):
        step = max(1, a.shape[0] * a.shape[1] // _PERCENTILE_SAMPLE)
        sample = a[::step] if step > 1 else a  # deterministic: every step-th row
        return torch.quantile(sample, self.percentile / 100.0, dim=0)

    def _merge(self, old, new):  # running mean over batches
        return old + (new - old) / (self.batches + 1)


OBSERVERS: dict[str, type[Observer]] = {"minmax": MinMaxObserver, "percentile": PercentileObserver}


def make_observer(kind: str, per_channel: bool = False, percentile: float = 99.99) -> Observer:
    if kind not in OBSERVERS:
        raise ValueError(f"unknown observer {kind!r}; valid: {', '.join(OBSERVERS)}")
    cls = OBSERVERS[kind]
    return cls(per_channel, percentile) if cls is PercentileObserver else cls(per_channel)


def _as_args(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


@torch.no_grad()
def observe(
    model: nn.Module,
    batches: Iterable,
    inputs: dict[str, Observer] | None = None,
    outputs: dict[str, Observer] | None = None,
    transform: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> int:
    """Run ``model(*batch)`` over ``batches`` with hooks feeding the observers.

    ``inputs[name]`` sees the first positional input of submodule ``name``,
    ``outputs[name]`` its output (after ``transform[name]`` if given). A batch is a
    tensor or a tuple of positional arguments. Returns the number of batches run.
    """
    inputs, outputs, transform = inputs or {}, outputs or {}, transform or {}
    if batches is None:
        raise ValueError("static int8 quantization needs calibration batches (an iterable of model inputs), got None")
    n = 0
    with ExitStack() as stack:
        for name, obs in inputs.items():
            h = model.get_submodule(name).register_forward_pre_hook(lambda m, args, obs=obs: obs(args[0]))
            stack.callback(h.remove)
        for name, obs in outputs.items():
            fn = transform.get(name, lambda t: t)
            h = model.get_submodule(name).register_forward_hook(lambda m, a, out, obs=obs, fn=fn: obs(fn(out)))
            stack.callback(h.remove)
        was_training = model.training
        model.eval()
        try:
            for batch in batches:
                model(*_as_args(batch))
                n += 1
        finally:
            model.train(was_training)
    if n == 0:
        raise ValueError("calibration batches were empty: static int8 quantization needs at least one batch")
    return n
