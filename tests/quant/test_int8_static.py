"""Static int8 (calibrated W8A8), observers, and the fused int8 ViT blocks vs fp32."""
import copy

import pytest
import torch
from torch import nn

from fastzoo.quant import (ACTIVATION_CONFIGS, Int8Dynamic, Int8Static, Int8StaticLinear, Int8ViTBlock,
                           MinMaxObserver, PercentileObserver, config_from_string, quantize_,
                           quantize_image_encoder_, quantize_vit_)
from fastzoo.quant.vit import Int8GeluMlp, Int8StaticLayerNorm
from fastzoo.vit import VisionTransformer, ViTConfig, build_vit
from helpers import kernels_on_cpu, sqnr

CFG = ViTConfig(img_size=64, patch_size=16, embed_dim=96, depth=2, num_heads=4, num_classes=100)


def _vit(seed=0):
    torch.manual_seed(seed)
    m = VisionTransformer(CFG).eval().requires_grad_(False)
    for p in m.parameters():  # timm-like random weights, no zero tensors
        p.add_(torch.randn_like(p) * 0.02)
    return m


def _images(n, seed):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_observers():
    x = torch.tensor([[1.0, -4.0], [-2.0, 3.0]])
    mm = MinMaxObserver()
    mm(x)
    mm(x * 0.5)
    assert torch.allclose(mm.scale(), torch.tensor([4.0 / 127]))
    pc = MinMaxObserver(per_channel=True)
    pc(x)
    assert torch.allclose(pc.scale(), torch.tensor([2.0, 4.0]) / 127)
    big = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    big[0] = 1000.0  # one outlier: min-max follows it, the percentile does not
    p = PercentileObserver(percentile=99.9)
    p(big)
    assert 3.0 < p.scale().item() * 127 < 3.6
    mm = MinMaxObserver()
    mm(big)
    assert mm.scale().item() == pytest.approx(1000.0 / 127)
    with pytest.raises(RuntimeError, match="saw no data"):
        MinMaxObserver().scale()
    with pytest.raises(ValueError, match="percentile must be in"):
        PercentileObserver(percentile=0)


def test_configs_and_errors():
    assert config_from_string("int8static") == Int8Static()
    assert config_from_string("int8static-qattn") == Int8Static(attention="int8")
    assert config_from_string("int8dq-qattn") == Int8Dynamic(attention="int8")
    assert set(ACTIVATION_CONFIGS) == {"int8dq", "int8dq-qattn", "int8static", "int8static-qattn"}
    with pytest.raises(ValueError, match="observer must be one of"):
        Int8Static(observer="mse")
    with pytest.raises(ValueError, match="attention must be one of"):
        Int8Dynamic(attention="flash")
    with pytest.raises(ValueError, match="int8static needs calibration batches"):
        quantize_(nn.Sequential(nn.Linear(8, 8)), "int8static")
    with pytest.raises(ValueError, match="int8static needs calibration batches"):
        quantize_vit_(_vit(), "int8static")
    with pytest.raises(ValueError, match="calibration batches were empty"):
        quantize_vit_(_vit(), "int8static", calibration=[])
    with pytest.raises(TypeError, match="expects a fastzoo.vit VisionTransformer"):
        quantize_vit_(nn.Sequential(nn.Linear(8, 8)), "int8dq")
    with pytest.raises(ValueError, match="not available for SAM's image encoder"):
        quantize_image_encoder_(nn.Sequential(nn.Linear(8, 8)), "int8static-qattn")


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_static_linears_generic_quantize(granularity, observer):
    """quantize_ with calibration on a plain MLP (the path SAM's encoder takes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    cal = [torch.randn(32, 64) for _ in range(3)]
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref = model(x)
        quantize_(model, Int8Static(observer=observer, weight=granularity), calibration=cal)
        out = model(x)
    assert isinstance(model[0], Int8StaticLinear) and model[0].scales.numel() == (128 if granularity == "channel"
                                                                                   else 1)
    assert sqnr(out, ref) >= 25


def _accuracy(config, calibration=None):
    m = _vit()
    x = _images(32, seed=1)
    with torch.no_grad():
        ref = m(x)
        quantize_vit_(m, config, calibration=calibration)
        out = m(x)
    assert all(isinstance(b, Int8ViTBlock) for b in m.blocks)
    db, top1 = sqnr(out, ref), (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"\n{config.name} ({config}): logits SQNR {db:.1f} dB vs fp32, top-1 agreement {100 * top1:.1f} %")
    return db, top1


@pytest.mark.parametrize("attention", ["sdpa", "int8"])
def test_vit_int8_dynamic_vs_fp32(attention):
    db, top1 = _accuracy(Int8Dynamic(attention=attention))
    assert db >= 25 and top1 >= 0.8


@pytest.mark.parametrize("config", [Int8Static(), Int8Static(attention="int8"),
                                    Int8Static(observer="percentile", attention="int8"),
                                    Int8Static(weight="tensor")], ids=lambda c: str(c))
def test_vit_int8_static_vs_fp32(config):
    db, top1 = _accuracy(config, calibration=[_images(8, seed=s) for s in (10, 11)])
    assert db >= 20 and top1 >= 0.8


def test_build_vit_quantize_options():
    m = _vit()
    name = "vit_tiny_patch16_224"  # the named config needs 224 images: use the small one through quantize_vit_
    x = _images(4, seed=2)
    with torch.no_grad():
        ref = m(x)
        q = quantize_vit_(copy.deepcopy(m), "int8static-qattn", calibration=[_images(4, seed=3)])
        assert q.blocks[0].static and q.blocks[0].attention == "int8"
        assert sqnr(q(x), ref) >= 20
    with pytest.raises(ValueError, match="needs calibration batches"):
        build_vit(name, quantize="int8static")
    v = build_vit(name, quantize="int8dq-qattn")
    assert isinstance(v.blocks[0], Int8ViTBlock) and v.blocks[0].attention == "int8"
    assert type(v.head).__name__ == "Linear"


@pytest.mark.parametrize("config", ["int8dq", Int8Static()], ids=str)
def test_quantized_vit_runs_after_a_dtype_cast(config):
    # model.to(bf16) casts the scale buffers; the int8 kernels take fp32 scales.
    m, x = _vit(), _images(2, seed=4)
    q = quantize_vit_(copy.deepcopy(m), config, calibration=[_images(4, seed=5)] if config != "int8dq" else None)
    with torch.no_grad():
        ref = q(x)
        out = q.to(torch.bfloat16)(x.bfloat16()).float()
    assert sqnr(out, ref) >= 15  # bf16 activations on top of int8: still the same function


def test_compile_fullgraph_static_block():
    import torch._dynamo.testing

    m = quantize_vit_(_vit(), Int8Static(attention="int8"), calibration=[_images(4, seed=5)])
    x = _images(2, seed=6)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    f = torch.compile(m, backend=counter, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(f(x), m(x))
    names = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    for op in ("layernorm_quant_int8", "int8_scaled_mm", "int8_attention"):
        assert any(op in t for t in names), op
    assert counter.frame_count == 1


@pytest.mark.cuda
@pytest.mark.parametrize("quantize", ["int8dq", "int8dq-qattn", "int8static", "int8static-qattn"])
def test_cuda_vit_base_bf16_compiled_vs_fp32(quantize):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = ref.state_dict()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 224, 224, generator=g).cuda()
    cal = [torch.randn(32, 3, 224, 224, generator=g).cuda().bfloat16() for _ in range(2)]
    with torch.no_grad():
        truth = ref.cuda()(x)
        m = build_vit("vit_base_patch16_224", dtype=torch.float32)
        m.load_state_dict(sd, strict=True)
        m = m.to("cuda", torch.bfloat16)
        quantize_vit_(m, quantize, calibration=cal)
        if quantize.endswith("qattn"):  # Inductor around the custom ops; the others eager (kernels too)
            m = torch.compile(m)
        out = m(x.bfloat16()).float()
    db, top1 = sqnr(out, truth), (out.argmax(-1) == truth.argmax(-1)).float().mean().item()
    print(f"\nvit_base {quantize}: SQNR {db:.1f} dB, top-1 agreement {100 * top1:.1f} %")
    assert db >= (25 if "dq" in quantize else 20)


@pytest.mark.parametrize("config", [Int8Dynamic(attention="int8"), Int8Static(attention="int8"), Int8Static()],
                         ids=lambda c: c.name)
def test_vit_block_kernel_path_matches_reference_path(kernel_device, monkeypatch, config):
    if kernel_device.type == "cuda":
        pytest.skip("covered by the cuda test below")
    cfg = ViTConfig(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=2, num_classes=10)
    torch.manual_seed(0)
    m = VisionTransformer(cfg).eval().requires_grad_(False)
    for p in m.parameters():
        p.add_(torch.randn_like(p) * 0.02)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # 5 tokens per image
    quantize_vit_(m, config, calibration=[x])
    with torch.no_grad():
        ref = m.forward_features(x)
        launched = kernels_on_cpu(monkeypatch)
        out = m.forward_features(x)
    assert len(launched) >= 6  # 2 LayerNorm+quant, 4 GEMMs (+ attention, row quantization)
    if config.attention == "int8":
        assert "_int8_attention_kernel" in launched
    assert sqnr(out, ref) >= 35  # equal up to fp32 ordering and the bf16 P·V of int8_attention


@pytest.mark.parametrize("config", ["int8dq", Int8Static(), Int8Static(observer="percentile", weight="tensor")],
                         ids=str)
def test_sam_image_encoder_quantization(config):
    sam_modeling = pytest.importorskip("segment_anything.modeling")
    torch.manual_seed(0)
    enc = sam_modeling.ImageEncoderViT(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, out_chans=32,
                                       window_size=2, global_attn_indexes=(1,), use_rel_pos=True).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        x = _images(2, seed=7)
        ref = enc(x)
        quantize_image_encoder_(enc, config, calibration=[_images(2, seed=8), _images(2, seed=9)])
        out = enc(x)
    linears = [m for n, m in enc.named_modules() if n.startswith("blocks.") and type(m).__name__.startswith("Int8")
               and type(m).__name__.endswith("Linear")]
    assert len(linears) == 8 and not any(isinstance(m, nn.Linear) for m in enc.blocks.modules())
    # segment_anything's MLPBlock (lin1, GELU, lin2) is fused too; its Block adds the residual itself;
    # static: its pre-norms write int8 for qkv and lin1
    assert all(type(b.mlp) is Int8GeluMlp for b in enc.blocks)
    static = isinstance(config, Int8Static)
    assert all((type(b.norm1) is Int8StaticLayerNorm) == static and (type(b.norm2) is Int8StaticLayerNorm) == static
               for b in enc.blocks)
    db = sqnr(out, ref)
    print(f"\nSAM image encoder {config}: SQNR {db:.1f} dB vs fp32")
    assert db >= 25


def test_static_linear_per_channel_out_scale_loads_into_a_fresh_module():
    """An Int8StaticLinear built by its constructor has the layout from_linear gives, per-channel
    out_scale (the ViT's qkv) included."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 48)
    src = Int8StaticLinear.from_linear(lin, torch.tensor([0.03]), out_scale=torch.rand(48) * 0.1 + 0.01)
    dst = Int8StaticLinear(24, 48, out_scale_size=48, dtype=torch.float32)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(5, 24)
    assert torch.equal(dst(x), src(x)) and dst(x).dtype == torch.int8
    with pytest.raises(ValueError, match="out_scale_size must be 0 .* or out_features=48 .*, got 3"):
        Int8StaticLinear(24, 48, out_scale_size=3)


@pytest.mark.parametrize("config", [Int8Static(), Int8Static(attention="int8"), Int8Static(weight="tensor"),
                                    Int8Dynamic(attention="int8")], ids=str)
def test_quantized_vit_state_dict_round_trip(config, tmp_path):
    """quantize (calibrated) → save → a fresh ViT on meta given the quantized layout (no
    calibration) → load strictly → identical logits."""
    cal = [_images(4, seed=12)] if isinstance(config, Int8Static) else None
    src = quantize_vit_(_vit(), config, calibration=cal)
    torch.save(src.state_dict(), tmp_path / "q.pth")
    with torch.device("meta"):
        dst = VisionTransformer(CFG)
    quantize_vit_(dst, config, for_loading=True)
    dst.load_state_dict(torch.load(tmp_path / "q.pth", weights_only=True), strict=True, assign=True)
    dst.eval()
    x = _images(3, seed=13)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    if config == Int8Static(attention="int8"):
        assert src.blocks[0].attn.qkv.out_scale.shape == (3 * CFG.embed_dim,)


def test_build_vit_loads_a_static_quantized_checkpoint(tmp_path):
    from fastzoo.vit import CheckpointError

    name, q = "vit_tiny_patch16_224", "int8static-qattn"
    g = torch.Generator().manual_seed(14)
    src = build_vit(name, quantize=q, calibration=[torch.randn(1, 3, 224, 224, generator=g)])
    torch.save(src.state_dict(), tmp_path / "q.pth")
    dst = build_vit(name, tmp_path / "q.pth", quantize=q, quantized_checkpoint=True)
    x = torch.randn(1, 3, 224, 224, generator=g)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    with pytest.raises(CheckpointError, match="loads with quantized_checkpoint=True"):
        build_vit(name, tmp_path / "q.pth", quantize=q, calibration=[x])
    torch.save(build_vit(name).state_dict(), tmp_path / "float.pth")
    with pytest.raises(CheckpointError, match="expects the state_dict.. of a ViT quantized with 'int8static-qattn'"
                                              "(.|\n)*missing keys"):
        build_vit(name, tmp_path / "float.pth", quantize=q, quantized_checkpoint=True)
    with pytest.raises(ValueError, match="quantized_checkpoint=True needs the checkpoint and the quantize config"):
        build_vit(name, tmp_path / "q.pth", quantized_checkpoint=True)


def test_static_linear_takes_an_out_scale_at_call_time_once():
    """``forward(x, out_scale=s)`` writes int8 with s (the next layer's input scale), as a
    module built with that out_scale does; a module with its own out_scale refuses a second."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(5, 32)
    in_scale, out_scale = x.abs().amax() / 127, torch.tensor([0.05])
    plain = Int8StaticLinear.from_linear(lin, in_scale)
    built = Int8StaticLinear.from_linear(lin, in_scale, out_scale=out_scale)
    got = plain(x, out_scale=out_scale)
    assert got.dtype == torch.int8
    assert torch.equal(got, built(x))
    with pytest.raises(ValueError, match="has its own out_scale"):
        built(x, out_scale=out_scale)
