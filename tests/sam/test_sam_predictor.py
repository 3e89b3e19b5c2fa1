"""End-to-end parity of SamPredictor / Sam with segment_anything (vit_b, random weights, fp32)."""
import numpy as np
import pytest
import torch
from helpers import rel_err
from sam_testutils import TINY_CONFIG, assert_masks_equal, generated_image, make_pair, sample_image

import fastzoo.sam as fz


@pytest.fixture(scope="module")
def vitb(tmp_path_factory):
    """Reference and fastzoo vit_b predictors on the same image; fastzoo loads a saved checkpoint."""
    from segment_anything import SamPredictor as RefPredictor

    ref, _ = make_pair()  # full-size vit_b, random weights incl. relative-position tables
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_b_random.pth"
    torch.save(ref.state_dict(), path)
    ours = fz.sam_model_registry["vit_b"](checkpoint=str(path))
    image = sample_image()
    rp, op = RefPredictor(ref), fz.SamPredictor(ours)
    rp.set_image(image)
    op.set_image(image)
    return rp, op, image


def test_image_embedding(vitb):
    rp, op, _ = vitb
    assert op.input_size == rp.input_size and op.original_size == rp.original_size
    assert rel_err(op.get_image_embedding(), rp.get_image_embedding()) <= 1e-4


def _prompts(image):
    h, w = image.shape[:2]
    p1 = np.array([[0.45 * w, 0.55 * h]])
    p3 = np.array([[0.45 * w, 0.55 * h], [0.2 * w, 0.3 * h], [0.8 * w, 0.7 * h]])
    box = np.array([0.2 * w, 0.25 * h, 0.7 * w, 0.9 * h])
    return {
        "point": dict(point_coords=p1, point_labels=np.array([1])),
        "points_single": dict(point_coords=p3, point_labels=np.array([1, 0, 1]), multimask_output=False),
        "box": dict(box=box, multimask_output=False),
        "box_multi": dict(box=box),
        "points_box": dict(point_coords=p3[:2], point_labels=np.array([1, 0]), box=box, multimask_output=False),
        "logits": dict(point_coords=p1, point_labels=np.array([1]), return_logits=True),
    }


@pytest.mark.parametrize("case", ["point", "points_single", "box", "box_multi", "points_box", "logits", "mask_input"])
def test_predict_parity(vitb, case):
    rp, op, image = vitb
    prompts = _prompts(image)
    if case == "mask_input":
        _, _, low = rp.predict(**prompts["point"])
        kw = dict(point_coords=prompts["point"]["point_coords"], point_labels=np.array([1]),
                  mask_input=low[:1], multimask_output=False)
    else:
        kw = prompts[case]
    rm, ri, rl = rp.predict(**kw)
    om, oi, ol = op.predict(**kw)
    assert type(om) is np.ndarray and om.dtype == rm.dtype and om.shape == rm.shape
    assert oi.shape == ri.shape and ol.shape == rl.shape
    assert rel_err(torch.from_numpy(ol), torch.from_numpy(rl)) <= 1e-4
    assert rel_err(torch.from_numpy(oi), torch.from_numpy(ri)) <= 1e-4
    if kw.get("return_logits"):
        assert rel_err(torch.from_numpy(om), torch.from_numpy(rm)) <= 1e-4
    else:
        assert 0 < rm.sum() < rm.size, "degenerate reference mask: test would be vacuous"
        assert_masks_equal(om, rm, rp.predict(**kw, return_logits=True)[0])


def test_predict_torch_batched_prompts(vitb):
    rp, op, image = vitb
    h, w = image.shape[:2]
    boxes = torch.tensor([[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.3 * w, 0.2 * h, 0.9 * w, 0.95 * h]])
    points = torch.tensor([[[0.3 * w, 0.3 * h]], [[0.6 * w, 0.5 * h]]])
    labels = torch.ones(2, 1, dtype=torch.int)
    tb = rp.transform.apply_boxes_torch(boxes, image.shape[:2])
    tp = rp.transform.apply_coords_torch(points, image.shape[:2])
    torch.testing.assert_close(op.transform.apply_boxes_torch(boxes, image.shape[:2]), tb, rtol=0, atol=0)
    r = rp.predict_torch(tp, labels, tb, multimask_output=True)
    o = op.predict_torch(tp, labels, tb, multimask_output=True)
    assert_masks_equal(o[0], r[0], rp.predict_torch(tp, labels, tb, multimask_output=True, return_logits=True)[0])
    assert rel_err(o[1], r[1]) <= 1e-4 and rel_err(o[2], r[2]) <= 1e-4


def test_reset_and_errors(vitb):
    _, op, _ = vitb
    p = fz.SamPredictor(op.model)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="HxWx3"):
        p.set_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="image_format"):
        p.set_image(np.zeros((10, 10, 3), np.uint8), image_format="HSV")


# --------------------------------------------------------------------------- batches of images
TINY_SIZE = 256  # input resolution of the reduced model: 16x16 embedding, 64x64 low-res masks


@pytest.fixture(scope="module")
def tiny():
    return make_pair(TINY_CONFIG, seed=3, image_size=TINY_SIZE)


@torch.no_grad()
def test_sam_forward_batch_parity(tiny):
    """``Sam.forward`` on two images with different sizes and prompt counts/types."""
    from segment_anything.utils.transforms import ResizeLongestSide

    ref, ours = tiny
    t = ResizeLongestSide(TINY_SIZE)
    images = [generated_image((96, 128), 1), generated_image((120, 80), 2)]
    batch = []
    for i, im in enumerate(images):
        x = torch.as_tensor(t.apply_image(im)).permute(2, 0, 1).contiguous()
        rec = {"image": x, "original_size": im.shape[:2]}
        if i == 0:  # 3 prompts of 2 points each
            pts = np.array([[[20, 30], [60, 40]], [[100, 70], [10, 10]], [[64, 48], [30, 80]]])
            rec["point_coords"] = torch.as_tensor(t.apply_coords(pts, im.shape[:2]), dtype=torch.float)
            rec["point_labels"] = torch.tensor([[1, 0], [1, 1], [1, 0]], dtype=torch.int)
        else:  # 1 box with a mask input
            rec["boxes"] = torch.as_tensor(t.apply_boxes(np.array([[10, 20, 70, 100]]), im.shape[:2]), dtype=torch.float)
            rec["mask_inputs"] = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
        batch.append(rec)
    for multimask in (True, False):
        r = ref(batch, multimask_output=multimask)
        o = ours(batch, multimask_output=multimask)
        for rr, oo in zip(r, o):
            assert oo["masks"].shape == rr["masks"].shape
            assert torch.equal(oo["masks"], rr["masks"])
            assert rel_err(oo["iou_predictions"], rr["iou_predictions"]) <= 1e-4
            assert rel_err(oo["low_res_logits"], rr["low_res_logits"]) <= 1e-4


@torch.no_grad()
def test_predictor_image_batch_with_prompt_counts(tiny):
    """``set_images`` + ``predict_torch(num_prompts=...)`` equals per-image reference predictions."""
    from segment_anything import SamPredictor as RefPredictor

    ref, ours = tiny
    images = [generated_image((96, 128), 4), generated_image((100, 70), 5), generated_image((64, 64), 6)]
    counts = [2, 1, 3]
    g = torch.Generator().manual_seed(7)
    op = fz.SamPredictor(ours)
    op.set_images(images)
    rp = RefPredictor(ref)
    coords, labels, expected = [], [], []
    for im, c in zip(images, counts):
        pts = (torch.rand(c, 2, 2, generator=g) * torch.tensor([im.shape[1], im.shape[0]])).numpy()
        lab = torch.randint(0, 2, (c, 2), generator=g, dtype=torch.int32)
        rp.set_image(im)
        tp = torch.as_tensor(rp.transform.apply_coords(pts, im.shape[:2]), dtype=torch.float)
        expected.append((*rp.predict_torch(tp, lab, multimask_output=True),
                         rp.predict_torch(tp, lab, multimask_output=True, return_logits=True)[0]))
        coords.append(tp)
        labels.append(lab)
    masks, ious, lows = op.predict_torch(torch.cat(coords), torch.cat(labels), multimask_output=True, num_prompts=counts)
    assert len(masks) == len(images)
    for (rm, ri, rl, r_logits), om, oi, ol in zip(expected, masks, ious, lows):
        assert om.shape == rm.shape
        assert_masks_equal(om, rm, r_logits)
        assert rel_err(oi, ri) <= 1e-4 and rel_err(ol, rl) <= 1e-4
    with pytest.raises(ValueError, match="num_prompts"):
        op.predict_torch(torch.cat(coords), torch.cat(labels))


# --------------------------------------------------------------------------- low precision
@torch.no_grad()
@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 0.02), (torch.float16, 0.01)])
def test_low_precision_vs_fp32_reference(tiny, dtype, bound):
    """bf16 / fp16 model (as ``build_sam_fast`` prepares it) vs the fp32 reference; bf16
    within the SAM issue's accuracy goal (low-res mask logits ≤ 2e-2 relative error)."""
    from segment_anything import SamPredictor as RefPredictor

    ref, ours = tiny
    low = fz.build_sam_from_config(**TINY_CONFIG, image_size=TINY_SIZE)
    low.load_state_dict(ours.state_dict())
    low.to(dtype)
    low.prompt_encoder.pe_layer.float()
    image = generated_image((96, 128), 8)
    rp, op = RefPredictor(ref), fz.SamPredictor(low)
    rp.set_image(image)
    op.set_image(image)
    assert op.features.dtype == dtype
    emb_err = rel_err(op.features, rp.features)
    kw = dict(point_coords=np.array([[40, 50], [90, 30]]), point_labels=np.array([1, 0]))
    _, ri, rl = rp.predict(**kw)
    om, oi, ol = op.predict(**kw)
    assert om.dtype == bool and ol.dtype == np.float32
    logit_err = rel_err(torch.from_numpy(ol), torch.from_numpy(rl))
    iou_err = rel_err(torch.from_numpy(oi), torch.from_numpy(ri))
    print(f"{dtype}: embedding {emb_err:.2e}, low-res logits {logit_err:.2e}, iou {iou_err:.2e}")
    assert emb_err < bound and logit_err < bound and iou_err < bound


def test_build_sam_fast_cpu():
    sam = fz.build_sam_fast("vit_b", None, device="cpu", dtype="bf16", compile=True)
    assert sam.dtype == torch.bfloat16 and not sam.training
    assert sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    assert sam.pixel_mean.dtype == torch.float32
    assert all(not p.requires_grad for p in sam.parameters())
    enc = sam.image_encoder  # regional compile in place: state-dict keys unchanged
    assert all(m._compiled_call_impl is not None for m in (enc.patch_embed, *enc.blocks, enc.neck))
    assert all(k.startswith(("image_encoder.blocks", "image_encoder.p", "image_encoder.neck", "prompt_encoder", "mask_decoder"))
               for k in sam.state_dict())
    with pytest.raises(ValueError, match="unsupported dtype"):
        fz.build_sam_fast("vit_b", device="cpu", dtype=torch.int8, compile=False)
    with pytest.raises(ValueError, match="unknown SAM model type"):
        fz.build_sam_fast("vit_x", device="cpu", compile=False)
    assert all(blk.attn.fused_attention for blk in enc.blocks)  # default: the fused op
    with pytest.raises(ValueError, match=r"kernel must be one of \('fused', 'sdpa'\), found 'flash'"):
        fz.build_sam_fast("vit_b", device="cpu", compile=False, kernel="flash")


# --------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@torch.no_grad()
def test_forward_is_sync_free_cuda():
    ref, ours = make_pair()
    ours = ours.cuda()
    image = torch.randint(0, 256, (1, 3, 768, 1024), dtype=torch.uint8, device="cuda")
    coords = torch.rand(4, 2, 2, device="cuda") * 1000
    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [1, -1]], dtype=torch.int, device="cuda")
    boxes = torch.tensor([[10.0, 20, 500, 600]], device="cuda").expand(4, 4)
    masks = torch.randn(4, 1, 256, 256, device="cuda")
    x = ours.preprocess(image)  # noqa: F841 - warm-up outside sync checking (lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        emb = ours.image_encoder(ours.preprocess(image))
        for pts, bx, ms in [((coords, labels), None, None), ((coords, labels), boxes, masks), (None, boxes, None)]:
            sparse, dense = ours.prompt_encoder(pts, bx, ms)
            low, iou = ours.mask_decoder(emb, ours.prompt_encoder.get_dense_pe(), sparse, dense, True)
            m = ours.postprocess_masks(low, (768, 1024), (600, 800)) > 0
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert m.shape == (4, 3, 600, 800)


@pytest.mark.cuda
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cuda_vs_fp32_reference(dtype):
    from segment_anything import SamPredictor as RefPredictor

    ref, ours = make_pair()
    sd = ours.state_dict()
    low = fz.build_sam_from_config(**fz.SAM_CONFIGS["vit_b"])
    low.load_state_dict(sd)
    low = low.to("cuda", dtype)
    low.prompt_encoder.pe_layer.float()
    ref = ref.cuda()
    image = sample_image()
    rp, op = RefPredictor(ref), fz.SamPredictor(low)
    rp.set_image(image)
    op.set_image(image)
    kw = dict(point_coords=np.array([[300, 200]]), point_labels=np.array([1]))
    _, ri, rl = rp.predict(**kw)
    _, oi, ol = op.predict(**kw)
    assert rel_err(op.features, rp.features) < 0.05
    assert rel_err(torch.from_numpy(ol), torch.from_numpy(rl)) < 0.05
    # IoU predictions of random weights sit near zero, where a relative error says
    # little: bound the absolute error instead (bf16 keeps ~3 significant digits).
    assert np.abs(oi - ri).max() < 5e-3
