"""fastzoo.vit against timm on the same random weights; checkpoint formats; errors."""
import pytest
import torch

from fastzoo.vit import VIT_CONFIGS, CheckpointError, VisionTransformer, ViTConfig, build_vit
from helpers import rel_err, sqnr

timm = pytest.importorskip("timm")


def _timm_model(name, **kw):
    """timm's ``name`` (``pretrained=False``) in fp32 with every tensor random (timm zero-initialises
    biases and the class token): built on the meta device and filled here, which is much faster
    than timm's own init for the base models. LayerNorm weights around 1, everything else N(0, 0.02)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, **kw)
    assert not list(m.buffers())  # to_empty would leave buffers uninitialised
    m.to_empty(device="cpu").eval()
    with torch.no_grad():
        for mod in m.modules():
            for pname, p in mod.named_parameters(recurse=False):
                p.normal_(1.0 if isinstance(mod, torch.nn.LayerNorm) and pname == "weight" else 0.0, 0.02)
    return m


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    ref = _timm_model("vit_tiny_patch16_224")
    path = tmp_path_factory.mktemp("vit") / "vit_tiny.pth"
    torch.save(ref.state_dict(), path)
    return ref, path


def test_parity_with_timm_fp32(tiny_pair):
    ref, path = tiny_pair
    ours = build_vit("vit_tiny_patch16_224", path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-5
        assert rel_err(ours.forward_features(x), ref.forward_features(x)) <= 1e-5


# issue 8's parity set: every vit_{small,base}_patch{16,32}_{224,384} (all eight are timm names);
# one loads from safetensors. The 384 / patch16 base models take a few seconds each on a CPU.
_PARITY = [(f"vit_{s}_patch{p}_{r}", "safetensors" if (s, p, r) == ("small", 32, 384) else "pth")
           for s in ("small", "base") for p in (16, 32) for r in (224, 384)]


@pytest.mark.parametrize("name,fmt", [pytest.param(n, f, marks=[pytest.mark.slow] if "base_patch16" in n else [])
                                      for n, f in _PARITY])
def test_named_config_parity_with_timm_fp32(name, fmt, tmp_path):
    assert timm.is_model(name)
    ref = _timm_model(name)
    sd = ref.state_dict()
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    ours = build_vit(name, path)  # strict load
    assert ours.config.img_size == ref.patch_embed.img_size[0]
    torch.manual_seed(1)
    x = torch.randn(1, 3, ours.config.img_size, ours.config.img_size)
    with torch.no_grad():
        expected = ref(x)
        assert expected.shape == (1, 1000) and expected.std() > 0.1  # random weights: non-trivial logits
        assert rel_err(ours(x), expected) <= 1e-4


def test_parity_with_timm_unfused_attention(tiny_pair):
    """Against timm's explicit softmax(q·kᵀ)·v (not SDPA, which both use by default)."""
    ref, path = tiny_pair
    ours = build_vit("vit_tiny_patch16_224", path)
    for blk in ref.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(1, 3, 224, 224)
    try:
        with torch.no_grad():
            assert rel_err(ours(x), ref(x)) <= 1e-5
    finally:
        for blk in ref.blocks:
            blk.attn.fused_attn = True


def test_parity_small_custom_config():
    cfg = dict(img_size=64, patch_size=16, embed_dim=96, depth=2, num_heads=4, num_classes=7)
    ref = timm.models.vision_transformer.VisionTransformer(**cfg).eval()
    ours = VisionTransformer(ViTConfig(**cfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-5


@pytest.mark.parametrize("img,patch", [(32, 8), (20, 8), (16, 16)])
def test_patch_embedding_is_the_convolution(img, patch):
    """The patch embedding's matmul of patches equals its Conv2d (kernel = stride = patch) on the
    same weights, flattened token order included, also where the image is not a whole number
    of patches (the convolution ignores the rest) and for a non-contiguous input."""
    from fastzoo.vit.model import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(ViTConfig(img_size=img, patch_size=patch, embed_dim=24, depth=1, num_heads=2)).eval()
    x = torch.randn(2, 3, img + 3, img).transpose(-1, -2)[..., :img, :]  # non-contiguous, W = img + 3 cropped away
    want = pe.proj(x).flatten(2).transpose(1, 2)
    got = pe(x)
    assert got.shape == want.shape == (2, (img // patch) ** 2, 24)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(VIT_CONFIGS))
def test_every_named_config_matches_timm_state_dict(name):
    with torch.device("meta"):
        ref_sd = timm.create_model(name, pretrained=False).state_dict()
        ours = VisionTransformer(VIT_CONFIGS[name])
    own = ours.state_dict()
    assert list(own) == list(ref_sd)
    assert all(own[k].shape == ref_sd[k].shape for k in own)


def test_safetensors_and_wrapped_checkpoints(tiny_pair, tmp_path):
    from safetensors.torch import save_file

    ref, _ = tiny_pair
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(sd, tmp_path / "m.safetensors")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = ref(x)
        for f in ["m.safetensors", "wrapped.pth"]:
            assert rel_err(build_vit("vit_tiny_patch16_224", tmp_path / f)(x), expected) <= 1e-5


def test_bad_inputs(tiny_pair, tmp_path):
    _, path = tiny_pair
    with pytest.raises(ValueError, match="unknown ViT 'vit_mega'.*vit_base_patch16_224"):
        build_vit("vit_mega")
    with pytest.raises(CheckpointError, match="not found"):
        build_vit("vit_tiny_patch16_224", tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_vit("vit_tiny_patch16_224", tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"cls_token: expected shape \(1, 1, 384\), found \(1, 1, 192\)"):
        build_vit("vit_small_patch16_224", path)
    # the error says what the checkpoint probably is: another size / resolution, another head
    with pytest.raises(CheckpointError, match="width 192, patch 16, resolution 224: vit_tiny_patch16_224"):
        build_vit("vit_tiny_patch16_384", path)
    with pytest.raises(CheckpointError, match="its head has 1000 classes: pass num_classes=1000"):
        build_vit("vit_tiny_patch16_224", path, num_classes=10)
    sd = torch.load(path)
    headless = {k: v for k, v in sd.items() if not k.startswith("head.")}
    torch.save(headless, tmp_path / "headless.pth")
    with pytest.raises(CheckpointError, match="no head .*pass num_classes=0"):
        build_vit("vit_tiny_patch16_224", tmp_path / "headless.pth")
    assert build_vit("vit_tiny_patch16_224", tmp_path / "headless.pth", num_classes=0)(
        torch.randn(1, 3, 224, 224)).shape == (1, 192)  # headless: the class token's features
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 224, 224\), got \(1, 3, 64, 64\)"):
        build_vit("vit_tiny_patch16_224")(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="torch.compile mode among .*'reduce-overhead'.*got 'fast'"):
        build_vit("vit_tiny_patch16_224", compile="fast")


def test_compile_mode_is_passed_to_torch_compile(monkeypatch):
    """compile=True compiles with torch's defaults, a string is torch.compile's mode."""
    import fastzoo.vit.build as vb

    seen = []
    monkeypatch.setattr(vb.torch, "compile", lambda model, **kw: seen.append(kw) or model)
    for compile in (True, "reduce-overhead", False):
        build_vit("vit_tiny_patch16_224", compile=compile)
    assert seen == [{}, {"mode": "reduce-overhead"}]


def test_bf16_and_int8_dynamic_accuracy(tiny_pair):
    ref, path = tiny_pair
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref.forward_features(x)
        bf16 = build_vit("vit_tiny_patch16_224", path, dtype=torch.bfloat16)
        assert rel_err(bf16.forward_features(x.bfloat16()).float(), expected) <= 3e-2
        q = build_vit("vit_tiny_patch16_224", path, quantize="int8dq")
        assert sqnr(q.forward_features(x), expected) >= 20
        assert type(q.head).__name__ == "Linear"  # the head stays in float
