"""GPTQ: same int4 layout as round-to-nearest, lower layer reconstruction error on calibration data."""
import copy

import pytest
import torch

from fastzoo.llama.quantize import calibration_tokens, gptq_quantize_llama_
from fastzoo.quant import Int4WeightOnly, Int4WeightOnlyLinear, quantize_
from fastzoo.quant.gptq import GPTQ, HessianCollector, gptq_quantize_weight
from llama_testutils import make_tiny_model


def _dequant(m: Int4WeightOnlyLinear):
    return m.dequantize(m.weight, m.scales, m.zeros, m.group_size, torch.float32)


def test_gptq_weight_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    out_f, in_f, n = 33, 128, 512
    # correlated inputs (low-rank + noise): where GPTQ's error compensation matters
    X = torch.randn(n, 8) @ torch.randn(8, in_f) + 0.1 * torch.randn(n, in_f)
    W = torch.randn(out_f, in_f)
    H = 2 * X.t() @ X / n
    for g in (32, 64, 128):
        packed, s, z = gptq_quantize_weight(W, H, group_size=g, blocksize=128, param_dtype=torch.float32)
        assert packed.dtype == torch.uint8 and packed.shape == (out_f, in_f // 2)
        assert s.shape == z.shape == (out_f, in_f // g)
        Wg = Int4WeightOnlyLinear.dequantize(packed, s, z, g, torch.float32)
        Wr = Int4WeightOnlyLinear.dequantize(*Int4WeightOnlyLinear.quantize(W, g), g, torch.float32)
        err_g = (X @ (W - Wg).t()).norm()
        err_r = (X @ (W - Wr).t()).norm()
        assert err_g < 0.8 * err_r, (g, float(err_g), float(err_r))


def test_hessian_collector_matches_definition():
    lin = torch.nn.Linear(7, 3, bias=False)
    c = HessianCollector({"lin": lin})
    xs = [torch.randn(2, 5, 7), torch.randn(4, 7)]
    for x in xs:
        lin(x)
    c.remove()
    X = torch.cat([x.reshape(-1, 7) for x in xs])
    torch.testing.assert_close(c.H["lin"], 2 * X.t() @ X / X.shape[0], rtol=1e-5, atol=1e-5)
    assert c.n["lin"] == 14 and not lin._forward_hooks


@pytest.mark.parametrize("group_size", [32, 64])
def test_gptq_llama_layer_error_below_rtn(group_size):
    model = make_tiny_model()
    tokens = calibration_tokens(torch.randint(0, 96, (256,), generator=torch.Generator().manual_seed(1)),
                                n_samples=8, seq_len=32)
    assert tokens.shape == (8, 32)
    # calibration inputs of every linear of layer 0 (the same for all models: nothing quantized before it)
    lins = {n: m for n, m in model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    X = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: X.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in lins.items()]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    gptq = gptq_quantize_llama_(copy.deepcopy(model), tokens, GPTQ(group_size, blocksize=64), progress=False)
    rtn = quantize_(copy.deepcopy(model), Int4WeightOnly(group_size))
    assert not any(isinstance(m, torch.nn.Linear) for m in gptq.modules())
    for name, lin in lins.items():
        x = torch.cat(X[name])
        qg, qr = gptq.layers[0].get_submodule(name), rtn.layers[0].get_submodule(name)
        assert isinstance(qg, Int4WeightOnlyLinear) and qg.group_size == group_size
        assert qg.weight.shape == qr.weight.shape and qg.scales.shape == qr.scales.shape
        err_g = (x @ (lin.weight - _dequant(qg)).t()).norm()
        err_r = (x @ (lin.weight - _dequant(qr)).t()).norm()
        assert err_g < err_r, (name, float(err_g), float(err_r))
        # the module's forward (the int4 op) computes with the stored layout
        torch.testing.assert_close(qg(x), x @ _dequant(qg).t(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        ref = model(tokens)
        e_g = (gptq(tokens) - ref).norm()
        e_r = (rtn(tokens) - ref).norm()
    assert e_g < e_r  # end to end on the calibration tokens too


def test_quantize_api_gptq_any_model_below_rtn():
    """``quantize_(model, GPTQ(g), calibration=batches)`` on a plain MLP: every linear becomes
    an int4 linear of that group size, the outputs on the calibration inputs are closer to
    the float model's than round-to-nearest's, and the model's training flag is kept."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).train()
    basis = torch.randn(8, 128)
    batches = [torch.randn(64, 8) @ basis + 0.1 * torch.randn(64, 128) for _ in range(4)]  # correlated inputs
    gptq = quantize_(copy.deepcopy(model), GPTQ(32, blocksize=64), calibration=batches)
    rtn = quantize_(copy.deepcopy(model), Int4WeightOnly(32))
    assert gptq.training and all(isinstance(gptq[i], Int4WeightOnlyLinear) and gptq[i].group_size == 32
                                 for i in (0, 2))
    with torch.no_grad():
        x = torch.cat(batches)
        ref = model(x)
        e_g, e_r = (gptq(x) - ref).norm(), (rtn(x) - ref).norm()
    assert e_g < 0.8 * e_r, (float(e_g), float(e_r))


def test_gptq_config_errors():
    with pytest.raises(ValueError, match="group_size"):
        GPTQ(48)
    with pytest.raises(ValueError, match="multiple of group_size"):
        GPTQ(64, blocksize=96)
    with pytest.raises(ValueError, match="calibration"):
        quantize_(make_tiny_model(), GPTQ(32))
    with pytest.raises(ValueError, match="divisible"):
        gptq_quantize_weight(torch.randn(4, 48), torch.eye(48), group_size=32, blocksize=32)
