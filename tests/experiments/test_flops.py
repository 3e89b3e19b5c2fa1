"""The FLOP counts behind every "% of ceiling" figure, checked against torch's FLOP counter
on the reference models (CPU)."""
from functools import partial

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode


def _counted(fn, *args) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # SDPA as matmuls
        fn(*args)
    return fc.get_total_flops()


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch32_384"])
def test_vit_flops_match_the_counter(name):
    from experiments.vit_throughput import vit_flops
    from fastzoo.vit import VIT_CONFIGS, build_vit

    res = VIT_CONFIGS[name].img_size
    assert _counted(build_vit(name), torch.randn(1, 3, res, res)) == vit_flops(name)


def test_sam_encoder_flops_match_segment_anything_minus_its_padding():
    """segment_anything's encoder at 320 px (a 20×20 grid, windowed blocks padded to 28×28):
    its counted FLOPs are encoder_flops plus the qkv and proj projections of the padding
    tokens, which it computes and fastzoo does not (8 windowed blocks of vit_b)."""
    pytest.importorskip("segment_anything")
    from segment_anything.modeling import ImageEncoderViT
    from experiments.sam_throughput import encoder_flops
    from fastzoo.sam.build import SAM_CONFIGS

    cfg, img = SAM_CONFIGS["vit_b"], 320
    C, glob = cfg["encoder_embed_dim"], cfg["encoder_global_attn_indexes"]
    enc = ImageEncoderViT(img_size=img, patch_size=16, embed_dim=C, depth=cfg["encoder_depth"],
                          num_heads=cfg["encoder_num_heads"], mlp_ratio=4, out_chans=256, qkv_bias=True,
                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          window_size=14, global_attn_indexes=glob).eval()
    g, gp = img // 16, 28
    padding = (cfg["encoder_depth"] - len(glob)) * 2 * (gp * gp - g * g) * C * (3 * C + C)
    assert _counted(enc, torch.randn(1, 3, img, img)) == encoder_flops("vit_b", img_size=img) + padding
