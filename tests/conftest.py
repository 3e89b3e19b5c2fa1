"""Shared pytest set-up.

Kernel tests run on a GPU when there is one; on a CPU-only machine Triton's
interpreter runs them on CPU tensors.  The interpreter is chosen by Triton when a
kernel is decorated, so it has to be switched on before any fastzoo kernel module
is imported: that is done here, for the test process only (the library itself
never reads or sets environment variables).
"""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_device():
    """Device for Triton kernel tests: the GPU, else the CPU under Triton's interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and Triton's interpreter is off")
    pytest.importorskip("triton")
    return torch.device("cpu")


@pytest.fixture
def shared_data():
    """The project's shared data folder (../shared/data); tests skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
