"""predict_torch over several images with different prompt counts: packed / nested / loop
batching give the per-image results (tiny SAM, fp32, CPU)."""
import numpy as np
import pytest
import torch
from helpers import rel_err
from sam_testutils import TINY_CONFIG, generated_image, make_pair

import fastzoo.sam as fz
from fastzoo.sam.predictor import BATCHING_MODES

TINY_SIZE = 256


@pytest.fixture(scope="module")
def setup():
    _, ours = make_pair(TINY_CONFIG, seed=5, image_size=TINY_SIZE)
    images = [generated_image((96, 128), 1), generated_image((120, 80), 2), generated_image((64, 64), 3),
              generated_image((100, 100), 4)]
    op = fz.SamPredictor(ours)
    op.set_images(images)
    return ours, op, images


def _prompts(images, counts, seed, kinds):
    """Prompts of all images concatenated, in the resized frame: points (2 per prompt) and/or boxes/masks."""
    g = torch.Generator().manual_seed(seed)
    t = fz.ResizeLongestSide(TINY_SIZE)
    coords, labels, boxes, masks = [], [], [], []
    for im, c in zip(images, counts):
        h, w = im.shape[:2]
        pts = (torch.rand(c, 2, 2, generator=g) * torch.tensor([w, h])).numpy()
        coords.append(torch.as_tensor(t.apply_coords(pts, (h, w)), dtype=torch.float))
        labels.append(torch.randint(0, 2, (c, 2), generator=g, dtype=torch.int32))
        xy = np.sort(torch.rand(c, 2, 2, generator=g).numpy() * np.array([w, h]), axis=1).reshape(c, 4)
        boxes.append(torch.as_tensor(t.apply_boxes(xy, (h, w)), dtype=torch.float))
        masks.append(torch.randn(c, 1, TINY_SIZE // 4, TINY_SIZE // 4, generator=g))
    kw = {}
    if "points" in kinds:
        kw.update(point_coords=torch.cat(coords), point_labels=torch.cat(labels))
    else:
        kw.update(point_coords=None, point_labels=None)
    if "boxes" in kinds:
        kw["boxes"] = torch.cat(boxes)
    if "masks" in kinds:
        kw["mask_input"] = torch.cat(masks)
    return kw


CASES = [([1, 7, 3, 2], ("points",), True), ([2, 1, 4, 1], ("points", "boxes"), False),
         ([3, 0, 2, 1], ("boxes", "masks"), True)]


@torch.no_grad()
@pytest.mark.parametrize("counts,kinds,multimask", CASES)
def test_batched_prompts_equal_per_image_calls(setup, counts, kinds, multimask):
    ours, op, images = setup
    kw = _prompts(images, counts, seed=sum(counts), kinds=kinds)
    results = {b: op.predict_torch(**kw, multimask_output=multimask, num_prompts=counts, batching=b)
               for b in BATCHING_MODES}
    loop_logits = op.predict_torch(**kw, multimask_output=multimask, return_logits=True, num_prompts=counts,
                                   batching="loop")[0]
    n_out = 3 if multimask else 1
    # per-image calls: each image embedded alone and decoded with its own prompts
    single = fz.SamPredictor(ours)
    start = 0
    for i, (im, c) in enumerate(zip(images, counts)):
        single.set_image(im)
        sl = {k: (v[start:start + c] if v is not None else None) for k, v in kw.items()}
        start += c
        if c == 0:
            for b in BATCHING_MODES:
                assert results[b][0][i].shape == (0, n_out, *im.shape[:2]) and results[b][1][i].shape == (0, n_out)
            continue
        rm, ri, rl = single.predict_torch(**sl, multimask_output=multimask)
        for b in BATCHING_MODES:
            om, oi, ol = (r[i] for r in results[b])
            assert om.shape == rm.shape == (c, n_out, *im.shape[:2]) and om.dtype == torch.bool
            assert oi.shape == ri.shape and ol.shape == rl.shape
            assert rel_err(ol, rl) <= 1e-5 and rel_err(oi, ri) <= 1e-5
        # the three batchings on the same (batched) embeddings
        for b in ("packed", "nested"):
            torch.testing.assert_close(results[b][2][i], results["loop"][2][i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(results[b][1][i], results["loop"][1][i], rtol=1e-5, atol=1e-5)
            differ = results[b][0][i] != results["loop"][0][i]
            assert not differ[loop_logits[i].abs() > 1e-4].any()
        assert torch.equal(results["loop"][0][i], loop_logits[i] > 0)


@torch.no_grad()
def test_packed_features_index(setup):
    _, op, _ = setup
    counts = [2, 0, 3, 1]
    for b in ("packed", "nested"):
        f = op._features_per_prompt(counts, b)
        expected = torch.cat([op.features[i:i + 1].expand(c, -1, -1, -1) for i, c in enumerate(counts)])
        assert torch.equal(f, expected), b


def test_batching_errors(setup):
    _, op, images = setup
    kw = _prompts(images, [1, 1, 1, 1], 0, ("points",))
    with pytest.raises(ValueError, match="batching must be one of packed, nested, loop, found 'jagged'"):
        op.predict_torch(**kw, num_prompts=[1, 1, 1, 1], batching="jagged")
    with pytest.raises(ValueError, match=r"num_prompts=\[1, 1, 2\] must have one non-negative entry per image \(4\)"):
        op.predict_torch(**kw, num_prompts=[1, 1, 2])
    with pytest.raises(ValueError, match="summing to the number of prompts \\(4\\)"):
        op.predict_torch(**kw, num_prompts=[1, 1, 1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        op.predict_torch(**kw, num_prompts=[2, -1, 2, 1])


@pytest.mark.cuda
@torch.no_grad()
@pytest.mark.parametrize("batching", ["packed", "nested"])
def test_batched_prompts_sync_free_cuda(batching):
    """Building the per-prompt embeddings and decoding never waits for the GPU."""
    _, ours = make_pair(TINY_CONFIG, seed=6, image_size=TINY_SIZE)
    op = fz.SamPredictor(ours.cuda())
    images = [generated_image((96, 128), 1), generated_image((120, 80), 2)]
    op.set_images(images)
    kw = _prompts(images, [3, 2], 1, ("points", "boxes"))
    kw = {k: v.cuda() for k, v in kw.items()}
    op.predict_torch(**kw, num_prompts=[3, 2], batching=batching, return_logits=True)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks, _, _ = op.predict_torch(**kw, num_prompts=[3, 2], batching=batching, return_logits=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    loop = op.predict_torch(**kw, num_prompts=[3, 2], batching="loop", return_logits=True)[0]
    for a, b in zip(masks, loop):
        assert rel_err(a, b) <= 1e-4
