"""2:4 sparsity in fastzoo.quant: pruning properties, Sparse24Linear / Int8DynamicSparse24Linear
on the CPU (dense fallback) and, on CUDA, the semi-structured paths."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastzoo.ops import int8_dynamic_linear_ref
from fastzoo.quant import (CONFIGS, Int8DynamicSparse24, Int8DynamicSparse24Linear, Sparse24, Sparse24Linear,
                           config_from_string, mask_2_4, prune_2_4, quantize_)
from fastzoo.quant.linear import quantize_weight_int8_per_channel
from helpers import sqnr


@pytest.mark.parametrize("shape", [(1, 4), (7, 12), (129, 36)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_mask_is_2_of_4_and_keeps_largest(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    w = (torch.randn(shape, generator=g) * 50).to(dtype)
    mask = mask_2_4(w)
    groups = mask.reshape(shape[0], -1, 4)
    assert (groups.sum(-1) == 2).all()
    a = w.float().abs().reshape(shape[0], -1, 4)
    kept_min = torch.where(groups, a, torch.inf).amin(-1)
    dropped_max = torch.where(groups, -torch.inf, a).amax(-1)
    assert (kept_min >= dropped_max).all()
    pruned = prune_2_4(w)
    assert pruned.dtype == w.dtype and pruned.shape == w.shape
    assert torch.equal(pruned, torch.where(mask, w, torch.zeros_like(w)))
    assert torch.equal(prune_2_4(pruned), pruned)  # idempotent


def test_mask_rejects_k_not_multiple_of_4():
    with pytest.raises(ValueError, match="divisible by 4, found 6"):
        mask_2_4(torch.randn(3, 6))


@pytest.mark.parametrize("bias", [True, False])
def test_sparse24_linear_cpu_equals_pruned_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(36, 7, bias=bias)
    sp = Sparse24Linear.from_linear(lin)
    assert not sp.uses_semi_structured
    x = torch.randn(2, 5, 36)
    torch.testing.assert_close(sp(x), F.linear(x, prune_2_4(lin.weight), lin.bias), rtol=0, atol=0)
    assert set(sp.state_dict()) == set(lin.state_dict())  # same keys as nn.Linear


def test_sparse24_state_dict_stories():
    torch.manual_seed(1)
    lin = nn.Linear(16, 8)
    sp = Sparse24Linear.from_linear(lin)
    # a sparse state dict loads strictly into a dense nn.Linear: the pruned model
    dense = nn.Linear(16, 8)
    dense.load_state_dict(sp.state_dict(), strict=True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(dense(x), sp(x), rtol=0, atol=0)
    # a dense state dict loaded into a Sparse24Linear is pruned again
    other = Sparse24Linear(16, 8)
    other.load_state_dict(lin.state_dict(), strict=True)
    assert torch.equal(other.weight, prune_2_4(lin.weight))
    assert (mask_2_4(other.weight) == (other.weight != 0)).all()


def test_int8_sparse24_cpu_is_int8_dynamic_on_pruned_weight():
    torch.manual_seed(2)
    lin = nn.Linear(64, 48)
    m = Int8DynamicSparse24Linear.from_linear(lin)
    assert not m.uses_semi_structured and m.weight.dtype == torch.int8
    q, s = quantize_weight_int8_per_channel(prune_2_4(lin.weight))
    assert torch.equal(m.weight, q) and torch.equal(m.scales, s)
    assert ((m.weight != 0).reshape(48, -1, 4).sum(-1) <= 2).all()
    x = torch.randn(5, 64)
    torch.testing.assert_close(m(x), int8_dynamic_linear_ref(x, q, s, lin.bias), rtol=0, atol=0)
    assert sqnr(m(x), F.linear(x, prune_2_4(lin.weight), lin.bias)) >= 25


def test_configs_and_errors():
    assert isinstance(config_from_string("sparse24"), Sparse24)
    assert isinstance(config_from_string("int8dq-sparse24"), Int8DynamicSparse24)
    assert {"sparse24", "int8dq-sparse24"} <= set(CONFIGS)
    with pytest.raises(ValueError, match="unknown quantization 'sparse'.*sparse24"):
        quantize_(nn.Sequential(nn.Linear(8, 8)), "sparse")
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize_(nn.Sequential(nn.Linear(8, 8)), 24)
    with pytest.raises(ValueError, match="cannot quantize '0' with sparse24: .*divisible by 4, found 6"):
        quantize_(nn.Sequential(nn.Linear(6, 8)), Sparse24())
    model = quantize_(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)), Sparse24(),
                      filter_fn=lambda m, fqn: fqn == "2")
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], Sparse24Linear)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparse24_semi_structured_cuda(dtype):
    torch.manual_seed(3)
    lin = nn.Linear(768, 3072).to("cuda", dtype)
    sp = Sparse24Linear.from_linear(lin)
    assert sp.uses_semi_structured, "expected the semi-structured path on an sm80+ GPU"
    x = torch.randn(2, 64, 64, 768, device="cuda", dtype=dtype)
    ref = F.linear(x.float(), sp.weight.float(), sp.bias.float())
    out = sp(x)
    assert out.dtype == dtype and out.shape == ref.shape
    assert sqnr(out, ref) >= 35
    compiled = torch.compile(sp, dynamic=False)
    assert sqnr(compiled(x), ref) >= 35
    dup = copy.deepcopy(sp)  # the compressed weight is rebuilt, not copied
    assert dup.uses_semi_structured and torch.equal(dup(x), out)
    # moved to the CPU: dense fallback, then back to CUDA: re-packed
    assert not sp.to("cpu").uses_semi_structured
    assert sp.to("cuda").uses_semi_structured


@pytest.mark.cuda
def test_int8_sparse24_semi_structured_cuda():
    torch.manual_seed(4)
    lin = nn.Linear(768, 3072).to("cuda", torch.bfloat16)
    m = Int8DynamicSparse24Linear.from_linear(lin)
    if not torch.backends.cusparselt.is_available():
        pytest.skip("cuSPARSELt not available: int8 2:4 falls back to int8 dynamic on pruned weights")
    assert m.uses_semi_structured
    x = torch.randn(4 * 1000 + 3, 768, device="cuda", dtype=torch.bfloat16)  # M not a multiple of 16
    out = m(x)
    fallback = int8_dynamic_linear_ref(x, m.weight, m.scales, m.bias)
    assert out.dtype == torch.bfloat16 and out.shape == fallback.shape
    assert sqnr(out, fallback) >= 35
    ref = F.linear(x.float(), prune_2_4(lin.weight).float(), lin.bias.float())
    assert sqnr(out, ref) >= 25
    assert sqnr(torch.compile(m, dynamic=False)(x), fallback) >= 35
