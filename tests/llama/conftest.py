"""Fixtures for the Llama tests: tokenizer files and converted tiny checkpoints."""
import pytest

pytest.importorskip("transformers")

from llama_testutils import TINY_CONFIGS, make_hf_model, write_tiktoken_file  # noqa: E402


@pytest.fixture(scope="session")
def tiktoken_file(tmp_path_factory):
    return write_tiktoken_file(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tiktoken_file):
    """{kind: (hf_model, fastzoo checkpoint dir)} for the tiny configurations."""
    from fastzoo.llama.convert import convert
    out = {}
    for kind in TINY_CONFIGS:
        hf = make_hf_model(kind)
        base = tmp_path_factory.mktemp(f"hf_{kind}")
        hf.save_pretrained(base / "hf", safe_serialization=True)
        out[kind] = (hf, convert(base / "hf", base / "fz", tokenizer=tiktoken_file, progress=False))
    return out


@pytest.fixture(autouse=True)
def _single_cpu_thread():
    """Tiny models: intra-op threading only adds contention (restored after each test)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
