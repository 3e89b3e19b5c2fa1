"""Helpers for the SAM parity tests: reference models with random (non-trivial) weights."""
from functools import partial

import torch

from fastzoo.sam import build_sam_from_config

FULL_CONFIGS = {
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16, encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16, encoder_global_attn_indexes=(7, 15, 23, 31)),
}
# A reduced encoder (same decoder) to keep CPU time down where the encoder size does not matter.
TINY_CONFIG = dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,))


def build_reference(encoder_embed_dim, encoder_depth, encoder_num_heads, encoder_global_attn_indexes, image_size=1024):
    """segment_anything's SAM, assembled from its own classes (as its ``_build_sam`` does)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = image_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=encoder_depth, embed_dim=encoder_embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=encoder_num_heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(encoder_global_attn_indexes),
            window_size=14, out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    )
    return sam.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the parameters the default init replaced by random values wherever the default
    would hide bugs: relative-position tables (zeros), absolute position embedding (zeros),
    norm weights/biases (ones/zeros)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "rel_pos" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        elif name.endswith("pos_embed"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif ("norm" in name or "neck" in name or "upscaling" in name or "mask_downscaling" in name) and p.ndim == 1:
            base = 1.0 if name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * 0.1)
    return model


def make_pair(config=None, seed=0, image_size=1024):
    """(reference, fastzoo) models with identical random weights, loaded strictly via a state dict."""
    config = dict(FULL_CONFIGS["vit_b"] if config is None else config)
    torch.manual_seed(seed)
    ref = randomize_(build_reference(**config, image_size=image_size), seed)
    ours = build_sam_from_config(**config, image_size=image_size)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data"


def sample_image(size=(534, 800), seed=0):
    """``../shared/data/dog.jpg`` as HxWx3 uint8 when present, else a generated image with blobs."""
    import numpy as np

    path = SHARED_DATA / "dog.jpg"
    if path.is_file() and size == (534, 800):
        from PIL import Image

        return np.array(Image.open(path).convert("RGB"))
    return generated_image(size, seed)


def generated_image(size=(96, 128), seed=0):
    """A deterministic HxWx3 uint8 image: smooth background with a few coloured discs."""
    import numpy as np

    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, np.full_like(xx, 90.0)], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(min(h, w) / 8, min(h, w) / 3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    return img.astype(np.uint8)


def assert_masks_equal(ours, ref, ref_logits, band=1e-4):
    """Binary masks identical, except pixels whose reference logit lies within ``band`` of the
    threshold (0), where float rounding in a different summation order may flip the sign;
    such pixels must be a vanishing fraction of the mask."""
    ours, ref, ref_logits = (torch.as_tensor(t) for t in (ours, ref, ref_logits))
    assert ours.shape == ref.shape == ref_logits.shape
    differ = ours != ref
    assert not differ[ref_logits.abs() > band].any(), "masks differ away from the threshold"
    assert differ.sum() <= max(1, ref.numel() // 100_000)
