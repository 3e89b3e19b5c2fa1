"""experiments.sam_eval on a generated COCO-format dataset (experiments.coco_synth), on the CPU
with a tiny random SAM: point sampler, IoU metric, the pipeline against the plain predictor,
the CLI's errors, and a 2-process torchrun run against the 1-process run."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from experiments import sam_eval  # noqa: E402
from experiments.coco_synth import make_coco_synth  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = ["--model-type", "tiny", "--image-size", "128", "--workers", "0", "--warmup", "0", "--no-progress"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    ann = make_coco_synth(tmp_path_factory.mktemp("coco") / "synth", n_images=4, seed=3)
    return ann.parent / "images", ann


def _brute_d2(mask):
    h, w = mask.shape
    pad = np.pad(mask, 1)
    bg = np.argwhere(~pad)
    out = np.zeros((h, w), np.int64)
    for y, x in np.argwhere(mask):
        out[y, x] = ((bg - [y + 1, x + 1]) ** 2).sum(1).min()
    return out


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (29, 31), (40, 9)])
def test_distance_transform_matches_brute_force(shape):
    g = torch.Generator().manual_seed(sum(shape))
    for p in (0.3, 0.8, 1.0):
        m = torch.rand(shape, generator=g) < p
        got = sam_eval.squared_distance_to_background(m)
        np.testing.assert_array_equal(got.numpy(), _brute_d2(m.numpy()))


def test_farthest_point_is_the_first_maximum_of_the_transform():
    g = torch.Generator().manual_seed(5)
    for shape, p in [((1, 1), 1.0), ((9, 14), 0.7), ((33, 20), 0.9), ((25, 25), 0.97)]:
        for _ in range(3):
            m = torch.rand(shape, generator=g) < p
            if not m.any():
                continue
            d2 = sam_eval.squared_distance_to_background(m)
            i = int(d2.flatten().argmax())
            assert sam_eval.farthest_point(m) == (i % shape[1], i // shape[1])


def test_farthest_point_is_inside_and_central(synth):
    yy, xx = np.mgrid[0:60, 0:80]
    disc = (xx - 50) ** 2 + (yy - 21) ** 2 < 15**2
    assert sam_eval.farthest_point(disc) == (50, 21)
    rect = np.zeros((30, 40), bool)
    rect[5:12, 10:31] = True  # 7 rows: the centre row 8, first column among ties at distance 4
    assert sam_eval.farthest_point(rect) == (13, 8)
    assert sam_eval.farthest_point(np.zeros((5, 5), bool)) is None
    # an L shape: the point must be inside, not at the (outside) centroid
    L = np.zeros((50, 50), bool)
    L[5:45, 5:15] = True
    L[35:45, 5:45] = True
    x, y = sam_eval.farthest_point(L)
    assert L[y, x]
    ds = sam_eval.CocoPoints(*synth)
    for i in range(len(ds)):
        it = ds[i]
        for m, (x, y) in zip(it["masks"], it["points"]):
            d2 = sam_eval.squared_distance_to_background(torch.from_numpy(m))
            assert m[int(y), int(x)] and d2[int(y), int(x)] == d2.max()


def test_mask_iou_known_cases():
    gt = torch.zeros(3, 6, 8, dtype=torch.bool)
    gt[0, 1:4, 2:6] = True
    gt[1, :, :4] = True
    gt[2, 5, 7] = True
    pred = torch.stack([gt, ~gt, gt.roll(1, -1)], 1)  # perfect, disjoint (complement), shifted
    iou = sam_eval.mask_iou(pred, gt)
    assert iou.shape == (3, 3)
    torch.testing.assert_close(iou[:, 0], torch.ones(3))
    torch.testing.assert_close(iou[:, 1], torch.zeros(3))
    # 3x4 box shifted by one column: 9 of 15; the 6x4 half shifted: 18 of 30; a pixel moved: 0
    torch.testing.assert_close(iou[:, 2], torch.tensor([9 / 15, 18 / 30, 0.0]))


def test_dataset_skips_crowd_and_decodes_all_encodings(synth):
    ds = sam_eval.CocoPoints(*synth)
    ds_crowd = sam_eval.CocoPoints(*synth, include_crowd=True)
    anns = json.loads(Path(synth[1]).read_text())["annotations"]
    assert sum(len(ds[i]["ann_ids"]) for i in range(len(ds))) == sum(1 for a in anns if not a["iscrowd"])
    assert sum(len(ds_crowd[i]["ann_ids"]) for i in range(len(ds_crowd))) == len(anns)
    kinds = {type(a["segmentation"]).__name__ + (type(a["segmentation"].get("counts")).__name__
                                                   if isinstance(a["segmentation"], dict) else "") for a in anns}
    assert kinds == {"list", "dictlist", "dictstr"}  # polygons, uncompressed and compressed RLE
    for i in range(len(ds)):
        it = ds[i]
        byid = {a["id"]: a for a in anns}
        for m, aid in zip(it["masks"], it["ann_ids"]):
            assert m.sum() == byid[aid]["area"]


def test_pipeline_matches_plain_predictor(synth, tmp_path):
    """Batched images and prompts give the IoUs of one-prompt-at-a-time ``SamPredictor.predict``."""
    out = tmp_path / "res"
    rc = sam_eval.main(["--images", str(synth[0]), "--annotations", str(synth[1]), *TINY, "--batch-size", "3",
                        "--out-dir", str(out), "--name", "run"])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "run.csv")))
    rec = json.loads((out / "run.json").read_text())
    ds = sam_eval.CocoPoints(*synth)
    assert len(rows) == rec["figures"]["annotations"] == sum(len(ds[i]["ann_ids"]) for i in range(len(ds)))
    a = sam_eval.parse_args(["--images", "x", "--annotations", "y", *TINY])
    a.device, a.dtype = "cpu", "fp32"
    from fastzoo.sam import SamPredictor

    pred = SamPredictor(sam_eval.build_model(a))
    k = 0
    for i in range(2):  # the first two images (one prompt at a time is slow)
        it = ds[i]
        pred.set_image(it["image"])
        for m, aid, (x, y) in zip(it["masks"], it["ann_ids"], it["points"]):
            masks, scores, _ = pred.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
            single, _, _ = pred.predict(np.array([[x, y]]), np.array([1]), multimask_output=False)
            ious = [(mk & m).sum() / (mk | m).sum() for mk in masks]
            r = rows[k]
            assert (int(r["image_id"]), int(r["ann_id"])) == (it["image_id"], aid)
            assert float(r["iou_oracle"]) == pytest.approx(max(ious), abs=1e-3)
            assert float(r["iou_top"]) == pytest.approx(ious[int(np.argmax(scores))], abs=1e-3)
            assert float(r["iou_single"]) == pytest.approx((single[0] & m).sum() / (single[0] | m).sum(), abs=1e-3)
            k += 1
    f = rec["figures"]
    assert f["miou_oracle"] == pytest.approx(np.mean([float(r["iou_oracle"]) for r in rows]))
    assert f["miou_oracle"] >= f["miou_top"] and f["img_per_s"] > 0 and f["images"] == len(ds)


def test_prompt_batch_one_equals_all(synth, tmp_path):
    base = ["--images", str(synth[0]), "--annotations", str(synth[1]), *TINY, "--limit", "2", "--out-dir",
            str(tmp_path), "--no-single-mask"]
    assert sam_eval.main([*base, "--name", "all"]) == 0
    assert sam_eval.main([*base, "--name", "one", "--prompt-batch", "1", "--batch-size", "2"]) == 0
    a = list(csv.DictReader(open(tmp_path / "all.csv")))
    b = list(csv.DictReader(open(tmp_path / "one.csv")))
    assert [r["ann_id"] for r in a] == [r["ann_id"] for r in b]
    for x, y in zip(a, b):
        assert float(x["iou_oracle"]) == pytest.approx(float(y["iou_oracle"]), abs=1e-3)
        assert x["iou_single"] == y["iou_single"] == "nan"


def test_cli_errors(synth, tmp_path, capsys):
    assert sam_eval.main(["--images", str(tmp_path / "nope"), "--annotations", str(synth[1]), *TINY]) == 2
    assert "images folder not found" in capsys.readouterr().err
    assert sam_eval.main(["--images", str(synth[0]), "--annotations", str(tmp_path / "x.json"), *TINY]) == 2
    assert "annotations file not found" in capsys.readouterr().err
    rc = sam_eval.main(["--images", str(synth[0]), "--annotations", str(synth[1]), *TINY, "--quantize", "int8",
                        "--out-dir", str(tmp_path)])
    assert rc == 3 and "unavailable:" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))
    with pytest.raises(SystemExit):
        sam_eval.parse_args(["--synthetic", "2", "--images", "x"])


def _launch(args, nproc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    launch = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    return subprocess.run([sys.executable, *launch, "-m", "experiments.sam_eval", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=180)


def test_torchrun_two_ranks_equal_one(synth, tmp_path):
    base = ["--images", synth[0], "--annotations", synth[1], *TINY, "--out-dir", tmp_path, "--device", "cpu"]
    r = _launch([*base, "--name", "two"], nproc=2)
    if r.returncode != 0:  # one retry: a launcher hiccup (port, rendezvous) on a loaded machine
        r = _launch([*base, "--name", "two"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1, r.stdout  # one report, from rank 0
    one = _launch([*base, "--name", "one"])
    assert one.returncode == 0, one.stderr[-3000:]
    a = (tmp_path / "one.csv").read_text()
    b = (tmp_path / "two.csv").read_text()
    assert a == b
    fa = json.loads((tmp_path / "one.json").read_text())["figures"]
    fb = json.loads((tmp_path / "two.json").read_text())["figures"]
    assert fb["world_size"] == 2 and fa["world_size"] == 1
    for k in ("images", "annotations", "miou_oracle", "miou_top", "miou_single"):
        assert fa[k] == fb[k], k


@pytest.mark.cuda
def test_gpu_eval_bf16_and_fp32(tmp_path):
    """On a GPU: vit_b (random weights) on generated images in fp32 and bf16, all prompts of a
    batch of 2 images in one decoder call; the figures are recorded and the two agree on counts."""
    figs = {}
    for dt in ("fp32", "bf16"):
        rc = sam_eval.main(["--synthetic", "4", "--model-type", "vit_b", "--dtype", dt, "--device", "cuda",
                            "--batch-size", "2", "--workers", "0", "--out-dir", str(tmp_path), "--name", dt,
                            "--no-progress"])
        assert rc == 0
        figs[dt] = json.loads((tmp_path / f"{dt}.json").read_text())["figures"]
        assert figs[dt]["peak_memory_gib"] > 0 and figs[dt]["img_per_s"] > 0
        assert 0 <= figs[dt]["miou_top"] <= figs[dt]["miou_oracle"] <= 1
    assert figs["fp32"]["annotations"] == figs["bf16"]["annotations"] > 0


def test_padding_a_short_batch_changes_nothing(synth):
    """A compiled encoder gets full batches: the pads (repeated last image, no prompts) do not
    change the IoUs of the real images."""
    from fastzoo.sam import SamPredictor

    a = sam_eval.parse_args(["--images", "x", "--annotations", "y", *TINY])
    a.device, a.dtype = "cpu", "fp32"
    pred = SamPredictor(sam_eval.build_model(a))
    ds = sam_eval.CocoPoints(*synth)
    batch = [ds[0], ds[1]]
    cpu = torch.device("cpu")
    plain = sam_eval._predict_batch(pred, batch, 0, True, cpu)
    for pb in (0, 2):
        padded = sam_eval._predict_batch(pred, batch, pb, True, cpu, pad_to=4)
        assert len(padded) == 2
        for x, y in zip(plain, padded):
            torch.testing.assert_close(x, y, atol=1e-3, rtol=0)
