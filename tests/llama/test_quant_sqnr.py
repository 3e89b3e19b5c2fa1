"""SQNR of quantized Llama logits against the float model, per mode, on a tiny random model
whose linears fit every int4 group size (thresholds stated in the README)."""
import copy

import pytest
import torch

from fastzoo.llama.quantize import gptq_quantize_llama_
from fastzoo.quant import quantize_
from fastzoo.quant.gptq import GPTQ
from helpers import sqnr
from llama_testutils import make_tiny_model

# dB, vs the fp32 model's logits; random Gaussian weights are int4's worst case (measured on
# three seeds: bf16 ~41, int8 ~35, int4 g32 ~13.5 down to g256 ~10.5, GPTQ g128 ~11.5)
THRESHOLDS = {"bf16": 37, "int8": 31, "int4-g32": 12, "int4-g64": 11, "int4-g128": 10, "int4-g256": 9.5,
              "gptq-g128": 10}


@pytest.fixture(scope="module")
def logits():
    model = make_tiny_model(seed=0, std=0.05, dim=256, intermediate_size=512, vocab_size=128, n_layers=1)
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    calibration = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(100))
    out = {}
    with torch.no_grad():
        ref = model(tokens)
        out["bf16"] = copy.deepcopy(model).to(torch.bfloat16)(tokens).float()
        for mode in ("int8", "int4-g32", "int4-g64", "int4-g128", "int4-g256"):
            out[mode] = quantize_(copy.deepcopy(model), mode)(tokens)
        q = gptq_quantize_llama_(copy.deepcopy(model), calibration, GPTQ(128), progress=False)
        out["gptq-g128"] = q(tokens)
    return ref, out


@pytest.mark.parametrize("mode", list(THRESHOLDS))
def test_logits_sqnr_per_mode(logits, mode):
    ref, out = logits
    assert sqnr(out[mode], ref) > THRESHOLDS[mode]


def test_smaller_int4_groups_are_closer(logits):
    ref, out = logits
    s = [sqnr(out[f"int4-g{g}"], ref) for g in (32, 64, 128, 256)]
    assert s == sorted(s, reverse=True), s
    assert sqnr(out["int8"], ref) > s[0] + 15
