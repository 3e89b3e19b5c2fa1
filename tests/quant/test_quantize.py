"""fastzoo.quant: quantize_ on a small MLP, accuracy, state-dict round trip, config table."""
import pytest
import torch
from torch import nn

from fastzoo.quant import (CONFIGS, Int4WeightOnly, Int4WeightOnlyLinear, Int8Dynamic, Int8DynamicLinear,
                           Int8WeightOnly, Int8WeightOnlyLinear, config_from_string, quantize_)
from helpers import sqnr


def mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 512, bias=bias), nn.GELU(), nn.Linear(512, 128, bias=bias))


CASES = [
    (Int8WeightOnly(), Int8WeightOnlyLinear, 30.0),
    (Int8Dynamic(), Int8DynamicLinear, 25.0),
    (Int4WeightOnly(32), Int4WeightOnlyLinear, 15.0),
    (Int4WeightOnly(128), Int4WeightOnlyLinear, 12.0),
]


@pytest.mark.parametrize("config,cls,min_db", CASES, ids=lambda c: getattr(c, "name", None))
@pytest.mark.parametrize("bias", [True, False])
def test_quantize_mlp_accuracy(config, cls, min_db, bias):
    model = mlp(bias=bias)
    x = torch.randn(64, 256)
    ref = model(x)
    quantize_(model, config)
    assert isinstance(model[0], cls) and isinstance(model[2], cls)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    out = model(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert sqnr(out, ref) >= min_db


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_state_dict_round_trip(config, tmp_path):
    src = quantize_(mlp(seed=1), config)
    torch.save(src.state_dict(), tmp_path / "q.pt")
    # A differently initialised model, quantized, then loaded strictly: identical outputs.
    dst = quantize_(mlp(seed=2), config)
    dst.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True), strict=True)
    x = torch.randn(5, 256)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_quantize_on_meta_then_assign(config):
    """The path for quantized checkpoints: build on meta, quantize_, load with assign=True."""
    sd = quantize_(mlp(seed=3), config).state_dict()
    with torch.device("meta"):
        model = mlp()
    quantize_(model, config)
    model.load_state_dict(sd, strict=True, assign=True)
    x = torch.randn(3, 256)
    torch.testing.assert_close(model(x), quantize_(mlp(seed=3), config)(x), rtol=0, atol=0)


def test_int8_weight_only_dequantized_weight_error_bound():
    lin = nn.Linear(64, 32)
    q = Int8WeightOnlyLinear.from_linear(lin)
    w = q.weight.float() * q.scales.float()[:, None]
    assert ((w - lin.weight).abs() <= q.scales[:, None] / 2 + 1e-7).all()


def test_int4_pack_round_trip_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    packed, scales, zeros = Int4WeightOnlyLinear.quantize(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 32)
    deq = Int4WeightOnlyLinear.dequantize(packed, scales, zeros, 32, torch.float32)
    assert ((deq - w).abs().reshape(16, 2, 32) <= scales[..., None] / 2 + 1e-6).all()
    # group minima and maxima are represented (to float rounding)
    g = w.reshape(16, 2, 32)
    torch.testing.assert_close(deq.reshape(16, 2, 32).amin(-1), g.amin(-1))
    torch.testing.assert_close(deq.reshape(16, 2, 32).amax(-1), g.amax(-1), rtol=1e-5, atol=1e-5)


def test_bf16_model_keeps_dtype():
    model = mlp().to(torch.bfloat16)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    for name in CONFIGS:
        m = quantize_(mlp().to(torch.bfloat16), name)
        assert m(x).dtype == torch.bfloat16
    assert model(x).dtype == torch.bfloat16


def test_filter_fn_and_errors():
    model = mlp()
    quantize_(model, "int8", filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn == "2")
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], Int8WeightOnlyLinear)
    with pytest.raises(ValueError, match="valid: int8, int8dq, int4-g32"):
        config_from_string("int3")
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4WeightOnly(48)
    with pytest.raises(ValueError, match=r"cannot quantize '0' with int4-g256.*in_features=256|in_features"):
        quantize_(nn.Sequential(nn.Linear(96, 8)), "int4-g256")
    with pytest.raises(TypeError, match="only nn.Linear"):
        quantize_(mlp(), "int8", filter_fn=lambda m, fqn: fqn == "1")
    assert config_from_string("int4-g64") == Int4WeightOnly(64)
    assert all(config_from_string(k).name == k for k in CONFIGS)


def test_int4_linear_rejects_unsupported_group_size():
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128, 256\), got 16"):
        Int4WeightOnlyLinear(64, 8, group_size=16)
