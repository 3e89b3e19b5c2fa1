"""The model's projections are plain nn.Linear, so fastzoo.quant.quantize_ can swap them."""
import pytest
import torch

from helpers import sqnr
from fastzoo.llama.checkpoint import load_model
from fastzoo.llama.generate import generate
from llama_testutils import VOCAB


def test_int8_weight_only_swaps_all_projections(converted):
    quant = pytest.importorskip("fastzoo.quant")
    _, ckpt = converted["gqa"]
    ref_model = load_model(ckpt, dtype=torch.float32)
    model = load_model(ckpt, dtype=torch.float32)
    quant.quantize_(model, "int8")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert names == [], names  # wqkv, wo, w13, w2, output all replaced
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert sqnr(model(tokens), ref_model(tokens)) > 25
    out = generate(model, [[1, 2, 3], [4, 5]], 4)
    assert all(len(t) == 4 for t in out.tokens)
