"""Small helpers shared by the models and scripts."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype, *, error: type[Exception] = ValueError) -> torch.dtype:
    """A model dtype from a ``torch.dtype`` or a name (``fp32``/``float32``, ``bf16``/``bfloat16``,
    ``fp16``/``float16``, optionally prefixed ``torch.``); anything else raises ``error``."""
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise error(f"unsupported dtype {dtype!r}; expected one of fp32, bf16, fp16")
        return _DTYPE_NAMES[key]
    if dtype not in FLOAT_DTYPES:
        raise error(f"unsupported dtype {dtype}; expected one of torch.float32, torch.bfloat16, torch.float16")
    return dtype


def torchrun_env():
    """``(rank, world_size, local_rank)`` when launched by torchrun with several ranks, else None.

    Reads the variables torchrun sets for its workers (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``): the launcher's protocol, not a behaviour switch.
    """
    import os

    env = os.environ
    if "MASTER_ADDR" not in env or int(env.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
