"""fastzoo.vit against timm on the same random weights; checkpoint formats; errors."""
import pytest
import torch

from fastzoo.vit import VIT_CONFIGS, CheckpointError, VisionTransformer, ViTConfig, build_vit
from helpers import rel_err, sqnr

timm = pytest.importorskip("timm")


def _timm_model(name, **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():  # timm zero-initialises some tensors: randomise them all
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
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


def test_parity_small_custom_config():
    cfg = dict(img_size=64, patch_size=16, embed_dim=96, depth=2, num_heads=4, num_classes=7)
    ref = timm.models.vision_transformer.VisionTransformer(**cfg).eval()
    ours = VisionTransformer(ViTConfig(**cfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-5


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
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 224, 224\), got \(1, 3, 64, 64\)"):
        build_vit("vit_tiny_patch16_224")(torch.randn(1, 3, 64, 64))


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
