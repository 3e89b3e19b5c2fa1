"""Module-level parity of fastzoo.sam.modeling with segment_anything (random weights, fp32)."""
import pytest
import torch
from helpers import rel_err
from sam_testutils import FULL_CONFIGS, TINY_CONFIG, build_reference, make_pair, randomize_

from fastzoo.sam import SAM_CONFIGS, build_sam_from_config, load_state_dict_checked, sam_model_registry
from fastzoo.sam.modeling import attention as fz_attention
from fastzoo.sam.modeling import image_encoder as fz_enc

OFFICIAL = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_reference_state_dict_loads_strict(model_type):
    """Keys and shapes identical to segment_anything for all three sizes (checked on the meta device)."""
    assert SAM_CONFIGS[model_type] == FULL_CONFIGS[model_type]
    with torch.device("meta"):
        ref = build_reference(**FULL_CONFIGS[model_type])
        ours = build_sam_from_config(**SAM_CONFIGS[model_type])
    ref_sd = ref.state_dict()
    ours_sd = ours.state_dict()
    assert list(ref_sd) == list(ours_sd)
    assert {k: v.shape for k, v in ref_sd.items()} == {k: v.shape for k, v in ours_sd.items()}
    ours.load_state_dict(ref_sd, strict=True, assign=True)
    load_state_dict_checked(ours, ref_sd, model_type=model_type)


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_official_checkpoint_loads(model_type, shared_data):
    path = shared_data / OFFICIAL[model_type]
    if not path.is_file():
        pytest.skip(f"{path} not present")
    sam = sam_model_registry[model_type](checkpoint=path)
    assert sam.image_encoder.img_size == 1024


@pytest.mark.parametrize("model_type", ["vit_l", "vit_h"])
@pytest.mark.parametrize("global_attn", [False, True])
def test_encoder_block_parity_large(model_type, global_attn):
    """One encoder block of vit_l / vit_h (random weights and rel-pos tables) matches the reference."""
    from segment_anything.modeling.image_encoder import Block as RefBlock

    from fastzoo.sam.modeling.image_encoder import Block

    cfg = FULL_CONFIGS[model_type]
    dim, heads = cfg["encoder_embed_dim"], cfg["encoder_num_heads"]
    kw = dict(dim=dim, num_heads=heads, mlp_ratio=4, qkv_bias=True, norm_layer=torch.nn.LayerNorm,
              use_rel_pos=True, window_size=0 if global_attn else 14, input_size=(64, 64))
    torch.manual_seed(0)
    ref = randomize_(RefBlock(**kw)).eval()
    ours = Block(**kw).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    # 32x32 grid: real window/padding behaviour (14 does not divide 32) and, for the global block,
    # a resized relative-position table (trained for 64x64).
    x = torch.randn(1, 32, 32, dim)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) < 1e-4


def test_rel_pos_tables_match_reference():
    """The encoder's tables (resize_rel_pos, then the op's table[r_q - r_k + n - 1]) equal
    segment_anything's get_rel_pos for the square windows and grids SAM uses, resized or not."""
    from segment_anything.modeling.image_encoder import get_rel_pos as ref_get_rel_pos

    from fastzoo.ops.rel_pos_attention import _relative_table

    table = torch.randn(27, 8)
    for n in (14, 9, 20):
        ours = _relative_table(n, fz_enc.resize_rel_pos(table, 2 * n - 1))
        torch.testing.assert_close(ours, ref_get_rel_pos(n, n, table), rtol=0, atol=0)


def test_rel_pos_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    B, nh, H, W, d = 2, 3, 5, 6, 8
    q, k, v = (torch.randn(B, nh, H * W, d) for _ in range(3))
    rel_h, rel_w = torch.randn(B, nh, H * W, H), torch.randn(B, nh, H * W, W)
    scale = d**-0.5
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, H * W, H * W)
    expected = torch.softmax(q @ k.transpose(-1, -2) * scale + bias, dim=-1) @ v
    assert rel_err(fz_attention.rel_pos_attention(q, k, v, rel_h, rel_w, scale), expected) < 1e-5


@pytest.fixture(scope="module")
def tiny_pair():
    return make_pair(TINY_CONFIG)


@torch.no_grad()
def test_tiny_image_encoder_parity(tiny_pair):
    ref, ours = tiny_pair
    x = torch.randn(2, 3, 1024, 1024)
    assert rel_err(ours.image_encoder(x), ref.image_encoder(x)) < 1e-4


@torch.no_grad()
def test_prompt_encoder_parity(tiny_pair):
    ref, ours = tiny_pair
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(3, 4, 2, generator=g) * 1024
    labels = torch.tensor([[1, 0, -1, 1], [0, 0, 1, -1], [1, 1, 1, 1]], dtype=torch.int)
    boxes = torch.sort(torch.rand(3, 2, 2, generator=g) * 1024, dim=1).values.reshape(3, 4)
    masks = torch.randn(3, 1, 256, 256, generator=g)
    for pts, bx, ms in [((coords, labels), None, None), (None, boxes, None), ((coords, labels), boxes, masks), (None, None, masks), (None, None, None)]:
        rs, rd = ref.prompt_encoder(pts, bx, ms)
        os_, od = ours.prompt_encoder(pts, bx, ms)
        assert os_.shape == rs.shape and od.shape == rd.shape
        if rs.numel():
            assert rel_err(os_, rs) < 1e-5
        assert rel_err(od, rd) < 1e-5
    assert rel_err(ours.prompt_encoder.get_dense_pe(), ref.prompt_encoder.get_dense_pe()) < 1e-6


@torch.no_grad()
def test_mask_decoder_parity(tiny_pair):
    ref, ours = tiny_pair
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    sparse = torch.randn(2, 3, 256, generator=g)
    dense = torch.randn(2, 256, 64, 64, generator=g)
    pe = ref.prompt_encoder.get_dense_pe()
    rm, ri = ref.mask_decoder.predict_masks(emb, pe, sparse, dense)
    om, oi = ours.mask_decoder.predict_masks(emb, pe, sparse, dense)
    assert rel_err(om, rm) < 1e-4 and rel_err(oi, ri) < 1e-4
    # per-prompt image embeddings (batched images) give the same as a shared one
    om2, oi2 = ours.mask_decoder(emb.expand(2, -1, -1, -1), pe, sparse, dense, multimask_output=False)
    torch.testing.assert_close(om2, om[:, :1])
    torch.testing.assert_close(oi2, oi[:, :1])
