"""``python -m fastzoo.sam``: end-to-end runs on a generated vit_b checkpoint, and bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sam_testutils import SHARED_DATA, generated_image, make_pair

from fastzoo.sam.__main__ import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    ref, _ = make_pair(seed=5)  # random vit_b weights in segment_anything's layout
    path = tmp_path_factory.mktemp("cli") / "sam_vit_b_random.pth"
    torch.save(ref.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    dog = SHARED_DATA / "dog.jpg"
    if dog.is_file():
        return dog
    path = tmp_path_factory.mktemp("img") / "generated.png"
    Image.fromarray(generated_image((300, 400), 0)).save(path)
    return path


def _size(path):
    with Image.open(path) as im:
        return im.size


def test_cli_prompted(ckpt, image_path, tmp_path, capsys):
    w, h = _size(image_path)
    out, ov = tmp_path / "mask.png", tmp_path / "overlay.png"
    rc = main([
        "--checkpoint", str(ckpt), "--model-type", "vit_b", "--image", str(image_path),
        "--point", f"{w // 2},{h // 2}", "--point", f"{w // 5},{h // 5},0", "--box", f"{w // 8},{h // 8},{w - 10},{h - 10}",
        "--multimask", "--output", str(out), "--overlay", str(ov), "--device", "cpu", "--dtype", "fp32",
    ])
    assert rc == 0
    text = capsys.readouterr().out
    assert "image embedding" in text and "ms" in text and "predicted IoU" in text
    mask = np.array(Image.open(out))
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    assert _size(ov) == (w, h)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png", "overlay.png"]  # no temp files left


def test_cli_amg(ckpt, image_path, tmp_path, capsys):
    from pycocotools import mask as mask_utils

    out = tmp_path / "amg"
    rc = main([
        "--checkpoint", str(ckpt), "--model-type", "vit_b", "--image", str(image_path), "--amg",
        "--points-per-side", "3", "--pred-iou-thresh", "-100", "--stability-score-thresh", "0",
        "--output", str(out), "--overlay", str(tmp_path / "amg.png"), "--device", "cpu",
    ])
    assert rc == 0
    assert "automatic mask generation" in capsys.readouterr().out
    data = json.loads((out / "masks.json").read_text())
    assert len(data["masks"]) > 0
    assert len(list(out.glob("mask_*.png"))) == len(data["masks"])
    for rec in data["masks"]:
        assert {"bbox", "area", "predicted_iou", "stability_score", "rle"} <= set(rec)
        png = np.array(Image.open(out / rec["file"])) > 0
        np.testing.assert_array_equal(mask_utils.decode(rec["rle"]).astype(bool), png)
        assert int(png.sum()) == rec["area"]


def test_cli_fast_amg_writes_the_same_masks(ckpt, image_path, tmp_path, capsys):
    outs = {}
    for flag in ([], ["--fast-amg"]):
        out = tmp_path / ("fast" if flag else "ref")
        rc = main([
            "--checkpoint", str(ckpt), "--model-type", "vit_b", "--image", str(image_path), "--amg",
            "--points-per-side", "3", "--pred-iou-thresh", "-100", "--stability-score-thresh", "0",
            "--output", str(out), "--device", "cpu", *flag,
        ])
        assert rc == 0, capsys.readouterr().err
        outs[bool(flag)] = json.loads((out / "masks.json").read_text())["masks"]
    assert len(outs[False]) > 0
    key = lambda m: (m["area"], m["bbox"])  # noqa: E731
    ref, fast = sorted(outs[False], key=key), sorted(outs[True], key=key)
    assert [(m["area"], m["bbox"], m["rle"]) for m in fast] == [(m["area"], m["bbox"], m["rle"]) for m in ref]


def _bad(args, tmp_path, capsys, match):
    before = set(tmp_path.iterdir())
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error:") and match in err, err
    assert set(tmp_path.iterdir()) == before, "nothing may be written on bad input"
    return err


def test_bad_inputs(ckpt, image_path, tmp_path, capsys):
    w, h = _size(image_path)
    out = str(tmp_path / "out" / "mask.png")
    (tmp_path / "out").mkdir()
    tmp_path = tmp_path / "out"
    base = ["--image", str(image_path), "--point", "5,5", "--output", out, "--device", "cpu"]

    _bad(["--checkpoint", str(tmp_path.parent / "nope.pth"), "--model-type", "vit_b", *base], tmp_path, capsys, "checkpoint not found")
    corrupt = tmp_path.parent / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a checkpoint" * 100)
    _bad(["--checkpoint", str(corrupt), "--model-type", "vit_b", *base], tmp_path, capsys, "cannot read checkpoint")
    err = _bad(["--checkpoint", str(ckpt), "--model-type", "vit_l", *base], tmp_path, capsys, "(model type 'vit_l') does not match the model")
    assert "looks like a 'vit_b' checkpoint" in err
    assert "expected shape (1, 64, 64, 1024), found (1, 64, 64, 768)" in err
    _bad(["--checkpoint", str(ckpt), "--model-type", "vit_x", *base], tmp_path, capsys, "unknown model type 'vit_x'")
    _bad(["--checkpoint", str(ckpt), "--model-type", "vit_b", *base, "--dtype", "int8"], tmp_path, capsys, "unsupported dtype")
    not_image = tmp_path.parent / "not_an_image.jpg"
    not_image.write_text("hello")
    args = ["--checkpoint", str(ckpt), "--model-type", "vit_b", "--output", out, "--device", "cpu"]
    _bad([*args, "--image", str(not_image), "--point", "1,1"], tmp_path, capsys, "cannot read image")
    _bad([*args, "--image", str(tmp_path.parent / "missing.png"), "--point", "1,1"], tmp_path, capsys, "image not found")
    img = ["--image", str(image_path)]
    _bad([*args, *img, "--point", f"{w + 5},10"], tmp_path, capsys, "outside the image")
    _bad([*args, *img, "--point=-1,10"], tmp_path, capsys, "outside the image")
    _bad([*args, *img, "--point", "3,4,7"], tmp_path, capsys, "label must be 0")
    _bad([*args, *img, "--point", "abc"], tmp_path, capsys, "comma-separated numbers")
    _bad([*args, *img, "--box", f"0,0,{w + 1},{h}"], tmp_path, capsys, "outside the image")
    _bad([*args, *img, "--box", "50,50,10,10"], tmp_path, capsys, "outside the image or empty")
    _bad([*args, *img], tmp_path, capsys, "at least one --point")
    _bad(["--checkpoint", str(ckpt), "--model-type", "vit_b", *img, "--point", "1,1", "--output", str(tmp_path / "no" / "m.png")],
         tmp_path, capsys, "does not exist")


def test_bad_input_exit_status_of_process(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastzoo.sam", "--checkpoint", str(tmp_path / "x.pth"), "--model-type", "vit_q",
         "--image", "x.png", "--point", "1,1", "--output", str(tmp_path / "m.png")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2
    assert "unknown model type 'vit_q'" in proc.stderr
    assert not (tmp_path / "m.png").exists()
