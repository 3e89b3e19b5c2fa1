"""Reading and checking state dicts: shared by every model of the zoo.

- ``read_state_dict(path)``: a ``torch.save`` file (memory-mapped when it is a zip file,
  plain ``torch.load`` for the legacy format) or a safetensors file, told apart by the
  file's content, never its name; ``{"state_dict": …}`` / ``{"model": …}`` wrappers unwrapped.
- ``check_state_dict(model, sd, source)``: the checks of ``load_state_dict(strict=True)``
  with a message that names every problem: missing and unexpected keys, expected and
  found shapes.

Both raise ``CheckpointError`` (a ``ValueError``), or the subclass given as ``error``.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

_WRAPPERS = ("state_dict", "model")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


def is_safetensors(path: str | os.PathLike) -> bool:
    """A safetensors file starts with the little-endian u64 length of a JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (n,) = struct.unpack("<Q", head)
            if not 2 <= n <= os.path.getsize(path) - 8:
                return False
            json.loads(f.read(n))
            return True
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def read_state_dict(path: str | os.PathLike, *, error: type[CheckpointError] = CheckpointError
                    ) -> dict[str, torch.Tensor]:
    """Read a state dict of tensors from ``path`` on the CPU (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"checkpoint not found: {str(path)!r} is not a file")
    try:
        if is_safetensors(path):
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad checkpoint
        raise error(f"cannot read checkpoint {str(path)!r}: expected a PyTorch state dict (torch.save) or a "
                    f"safetensors file ({type(e).__name__}: {e})") from None
    for wrapper in _WRAPPERS:
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise error(f"checkpoint {str(path)!r} is not a state dict: expected a mapping of names to tensors, "
                    f"found {type(sd).__name__}")
    return dict(sd)


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint", *,
                     hint: str | None = None, error: type[CheckpointError] = CheckpointError) -> None:
    """Raise ``error`` unless ``sd`` has exactly the model's keys with the model's shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [(k, tuple(v.shape), tuple(sd[k].shape)) for k, v in expected.items()
                  if k in sd and tuple(v.shape) != tuple(sd[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not match the model."]
    if hint:
        lines.append(hint)
    lines += [f"  {k}: expected shape {e}, found {f}" for k, e, f in mismatched[:5]]
    if len(mismatched) > 5:
        lines.append(f"  ... and {len(mismatched) - 5} more shape mismatches")

    def some(keys):
        return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")

    if missing:
        lines.append(f"  missing keys ({len(missing)}): {some(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {some(unexpected)}")
    raise error("\n".join(lines))


def load_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint", *,
                 assign: bool = False, hint: str | None = None,
                 error: type[CheckpointError] = CheckpointError) -> None:
    """``check_state_dict``, then ``model.load_state_dict(sd, strict=True, assign=assign)``."""
    check_state_dict(model, sd, source, hint=hint, error=error)
    model.load_state_dict(sd, strict=True, assign=assign)
