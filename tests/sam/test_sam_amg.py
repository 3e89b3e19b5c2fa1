"""SamAutomaticMaskGenerator parity with segment_anything (reduced model, small image, few points)."""
import numpy as np
import pytest
import torch
from sam_testutils import TINY_CONFIG, generated_image, make_pair

import fastzoo.sam as fz
from fastzoo.sam.utils import amg

SIZE = 256


@pytest.fixture(scope="module")
def pair():
    return make_pair(TINY_CONFIG, seed=11, image_size=SIZE)


def _compare(ours, ref):
    print(f"{len(ref)} masks")
    assert len(ours) == len(ref) and len(ref) > 0
    for o, r in zip(ours, ref):
        assert set(o) == set(r)
        assert o["bbox"] == r["bbox"] and o["area"] == r["area"] and o["crop_box"] == r["crop_box"]
        np.testing.assert_allclose(o["point_coords"], r["point_coords"])
        assert o["predicted_iou"] == pytest.approx(r["predicted_iou"], rel=1e-4, abs=1e-5)
        # a pixel whose logit lies within float rounding of threshold ± offset may flip: allow ~1 pixel
        assert o["stability_score"] == pytest.approx(r["stability_score"], abs=2.0 / max(o["area"], 1))
        if isinstance(r["segmentation"], np.ndarray):
            assert o["segmentation"].dtype == r["segmentation"].dtype
            np.testing.assert_array_equal(o["segmentation"], r["segmentation"])
        else:
            assert o["segmentation"] == r["segmentation"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(points_per_side=4, output_mode="binary_mask", box_nms_thresh=1.0),
        dict(points_per_side=4, points_per_batch=5, output_mode="coco_rle", box_nms_thresh=1.0),
        dict(points_per_side=4, crop_n_layers=1, crop_n_points_downscale_factor=2, output_mode="uncompressed_rle",
             box_nms_thresh=1.0, crop_nms_thresh=0.9),
        # NMS at work: 55 masks before it, 1 after (random weights give near-identical boxes)
        dict(points_per_side=6, output_mode="binary_mask", box_nms_thresh=0.7),
    ],
    ids=["binary", "coco_rle", "crops", "nms"],
)
def test_amg_parity(pair, kwargs):
    """Both of our pipelines (reference order, and fast: on-device filtering, NMS and RLE with
    small mask chunks) against segment_anything's generator."""
    from segment_anything import SamAutomaticMaskGenerator as RefAMG

    ref, ours = pair
    image = generated_image((96, 128), 12)
    # Random weights give weak logits (|x| < 1): a small stability offset keeps the filters meaningful.
    common = dict(pred_iou_thresh=-10.0, stability_score_thresh=0.2, stability_score_offset=0.05, **kwargs)
    r = RefAMG(ref, **common).generate(image)
    _compare(fz.SamAutomaticMaskGenerator(ours, **common).generate(image), r)
    _compare(fz.SamAutomaticMaskGenerator(ours, **common, fast=True, mask_chunk=7).generate(image), r)


def test_amg_explicit_grid_and_errors(pair):
    from segment_anything import SamAutomaticMaskGenerator as RefAMG

    ref, ours = pair
    image = generated_image((80, 60), 13)
    grid = [np.array([[0.25, 0.25], [0.5, 0.5], [0.75, 0.6]])]
    kw = dict(points_per_side=None, point_grids=grid, pred_iou_thresh=-10.0, stability_score_thresh=0.2,
              stability_score_offset=0.05, box_nms_thresh=1.0)
    _compare(fz.SamAutomaticMaskGenerator(ours, **kw).generate(image), RefAMG(ref, **kw).generate(image))
    with pytest.raises(ValueError, match="points_per_side"):
        fz.SamAutomaticMaskGenerator(ours, points_per_side=4, point_grids=grid)
    with pytest.raises(ValueError, match="output_mode"):
        fz.SamAutomaticMaskGenerator(ours, output_mode="png")


def test_rle_helpers_match_reference_and_pycocotools():
    from pycocotools import mask as mask_utils
    from segment_anything.utils import amg as ref_amg

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 23, 17, generator=g) > 0.6
    masks[0] = False
    masks[1] = True
    rles = amg.mask_to_rle_pytorch(masks)
    assert rles == ref_amg.mask_to_rle_pytorch(masks)
    for m, rle in zip(masks, rles):
        np.testing.assert_array_equal(amg.rle_to_mask(rle), m.numpy())
        assert amg.area_from_rle(rle) == int(m.sum())
        assert amg.coco_encode_rle(rle) == ref_amg.coco_encode_rle(rle)
        np.testing.assert_array_equal(mask_utils.decode(amg.coco_encode_rle(rle)).astype(bool), m.numpy())
    torch.testing.assert_close(amg.batched_mask_to_box(masks), ref_amg.batched_mask_to_box(masks))


def test_nms_matches_torchvision():
    from torchvision.ops import batched_nms as tv_batched_nms

    g = torch.Generator().manual_seed(0)
    xy = torch.randint(0, 50, (200, 2), generator=g).float()
    wh = torch.randint(1, 30, (200, 2), generator=g).float()
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(200, generator=g)
    cats = torch.randint(0, 3, (200,), generator=g)
    for thr in (0.3, 0.7):
        for c in (torch.zeros(200), cats):
            assert amg.batched_nms(boxes, scores, c, thr).tolist() == tv_batched_nms(boxes, scores, c, thr).tolist()


def test_amg_parity_with_iou_filter(pair):
    """pred_iou_thresh > 0 (random weights predict IoUs < 0: shift the IoU head of both models
    so that the threshold keeps about half of the candidates)."""
    import copy

    from segment_anything import SamAutomaticMaskGenerator as RefAMG

    ref, ours = (copy.deepcopy(m) for m in pair)
    with torch.no_grad():
        for m in (ref, ours):
            m.mask_decoder.iou_prediction_head.layers[-1].bias += 0.6
    image = generated_image((96, 128), 12)
    kw = dict(points_per_side=4, pred_iou_thresh=0.51, stability_score_thresh=0.2, stability_score_offset=0.05,
              box_nms_thresh=1.0)
    r = RefAMG(ref, **kw).generate(image)
    n_all = len(RefAMG(ref, **{**kw, "pred_iou_thresh": 0.0}).generate(image))
    assert 0 < len(r) < n_all
    _compare(fz.SamAutomaticMaskGenerator(ours, **kw).generate(image), r)
    _compare(fz.SamAutomaticMaskGenerator(ours, **kw, fast=True).generate(image), r)


@pytest.mark.parametrize("n", [0, 1, 7, 130])
def test_device_nms_matches_greedy(n):
    g = torch.Generator().manual_seed(n)
    xy = torch.randint(0, 60, (n, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(0, 30, (n, 2), generator=g).float()], 1)  # some empty boxes
    scores = torch.rand(n, generator=g).round(decimals=1)  # ties: the stable order decides
    cats = torch.randint(0, 3, (n,), generator=g)
    for thr in (0.0, 0.3, 0.7, 1.0):
        for c in (torch.zeros(n), cats):
            assert amg.batched_nms_device(boxes, scores, c, thr, block=16).tolist() == \
                amg.batched_nms(boxes, scores, c, thr).tolist()


def test_pack_and_device_rle_match_reference_rle():
    sa_amg = pytest.importorskip("segment_anything.utils.amg")
    g = torch.Generator().manual_seed(1)
    for shape in [(6, 1, 1), (5, 7, 9), (4, 13, 3)]:
        masks = torch.rand(shape, generator=g) > 0.5
        masks[0] = True
        masks[1] = False
        packed = amg.pack_masks(masks)
        assert packed.dtype == torch.uint8 and packed.shape == (shape[0], -(-shape[1] * shape[2] // 8))
        cm = amg.unpack_masks(packed, shape[1], shape[2])
        torch.testing.assert_close(cm, masks.transpose(1, 2), rtol=0, atol=0)
        assert amg.rle_from_column_major(cm.flatten(1), list(shape[1:])) == sa_amg.mask_to_rle_pytorch(masks)
        assert amg.mask_to_rle_pytorch(masks) == sa_amg.mask_to_rle_pytorch(masks)
    assert amg.rle_from_column_major(torch.zeros(0, 5, dtype=torch.bool), [1, 5]) == []


@pytest.mark.cuda
def test_fast_amg_on_gpu_matches_and_has_no_sync_in_the_point_loop(pair):
    """fp32 on the GPU: the fast path gives the reference path's masks, and the candidate loop
    (decoder, filters, boxes, packing) runs under sync debug mode 'error'."""
    _, ours = pair
    model = copy_to_cuda(ours)
    image = generated_image((96, 128), 12)
    kw = dict(points_per_side=6, pred_iou_thresh=-10.0, stability_score_thresh=0.2, stability_score_offset=0.05,
              crop_n_layers=1)
    gen = fz.SamAutomaticMaskGenerator(model, **kw, fast=True)
    _compare(gen.generate(image), fz.SamAutomaticMaskGenerator(model, **kw).generate(image))
    crop = gen._crop_setup(image, [0, 0, 128, 96], 0, (96, 128))  # embeds, copies prompts: outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gen._decode_candidates(crop)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert crop["keep"].shape[0] == 3 * 36 and bool(crop["keep"].any())


def copy_to_cuda(model):
    import copy

    return copy.deepcopy(model).cuda()


def test_fast_amg_no_survivor_and_errors(pair):
    _, ours = pair
    image = generated_image((40, 52), 3)
    kw = dict(points_per_side=2, stability_score_thresh=2.0)  # nothing passes
    for fast in (False, True):
        assert fz.SamAutomaticMaskGenerator(ours, **kw, fast=fast, output_mode="coco_rle").generate(image) == []
    with pytest.raises(ValueError, match="mask_chunk"):
        fz.SamAutomaticMaskGenerator(ours, fast=True, mask_chunk=0)
