"""A small synthetic COCO-format instance-segmentation dataset for smoke tests.

    python -m experiments.coco_synth OUT_DIR --images 8 --seed 0

writes ``OUT_DIR/images/*.png`` and ``OUT_DIR/annotations.json``: images of different sizes
with non-overlapping coloured shapes (discs, ellipses, rectangles, triangles, stars) on a
noisy background. Each shape is an annotation whose mask is known exactly; the masks are
stored in all three COCO encodings pycocotools reads (polygons, uncompressed RLE, compressed
RLE) and the pixels of a shape are painted from its decoded mask, so the ground truth is the
visible object. One ``iscrowd=1`` annotation per dataset exercises the crowd filter.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CATEGORIES = [{"id": 1, "name": "disc"}, {"id": 2, "name": "rectangle"}, {"id": 3, "name": "polygon"}]


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with background (COCO's uncompressed RLE)."""
    flat = mask.T.reshape(-1).astype(bool)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _polygon(kind: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> list[float]:
    if kind == "triangle":
        angles = rng.uniform(0, 2 * math.pi) + np.array([0, 2 * math.pi / 3, 4 * math.pi / 3])
        radii = np.full(3, r)
    else:  # star
        angles = rng.uniform(0, 2 * math.pi) + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    xs, ys = cx + radii * np.cos(angles), cy + radii * np.sin(angles)
    return np.stack([xs, ys], 1).reshape(-1).round(2).tolist()


def _shape_mask(kind: str, h: int, w: int, cx: float, cy: float, r: float, rng: np.random.Generator):
    """(mask, segmentation in COCO form) for one shape."""
    from pycocotools import mask as mask_utils

    yy, xx = np.mgrid[0:h, 0:w]
    if kind in ("triangle", "star"):
        poly = _polygon(kind, cx, cy, r, rng)
        rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
        return mask_utils.decode(rle).astype(bool), [poly]
    if kind == "disc":
        m = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    elif kind == "ellipse":
        a, b = r, r * rng.uniform(0.4, 0.8)
        m = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 < 1
    else:  # rectangle
        hw, hh = r, r * rng.uniform(0.5, 1.0)
        m = (abs(xx - cx) < hw) & (abs(yy - cy) < hh)
    return m, None


def make_coco_synth(out_dir: str | os.PathLike, n_images: int = 8, seed: int = 0,
                    sizes: tuple[tuple[int, int], ...] = ((96, 128), (120, 90), (80, 80), (100, 140)),
                    shapes_per_image: tuple[int, int] = (2, 5)) -> Path:
    """Write the dataset into ``out_dir`` (created; replaced atomically if present) and return
    the path of ``annotations.json``. Deterministic for a given seed."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    (tmp / "images").mkdir()
    rng = np.random.default_rng(seed)
    kinds = ["disc", "ellipse", "rectangle", "triangle", "star"]
    images, anns = [], []
    ann_id = 1
    for i in range(n_images):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 160 / w + 40, yy * 160 / h + 40, np.full((h, w), 70.0)], -1)
        img += rng.normal(0, 8, img.shape)
        taken = np.zeros((h, w), bool)
        n_shapes = int(rng.integers(shapes_per_image[0], shapes_per_image[1] + 1))
        for _ in range(n_shapes):
            for _attempt in range(30):
                kind = kinds[int(rng.integers(len(kinds)))]
                r = rng.uniform(min(h, w) / 10, min(h, w) / 4)
                cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
                mask, poly = _shape_mask(kind, h, w, cx, cy, r, rng)
                # non-overlapping, with a one-pixel gap, and big enough to matter
                grown = mask.copy()
                grown[1:] |= mask[:-1]; grown[:-1] |= mask[1:]; grown[:, 1:] |= mask[:, :-1]; grown[:, :-1] |= mask[:, 1:]
                if mask.sum() >= 20 and not (grown & taken).any():
                    break
            else:
                continue
            taken |= mask
            img[mask] = rng.uniform(0, 255, 3)
            if poly is not None:
                seg, cat = poly, 3
            elif ann_id % 2 == 0:
                seg, cat = _rle_uncompressed(mask), 1 if kind in ("disc", "ellipse") else 2
            else:
                enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                seg, cat = {"size": enc["size"], "counts": enc["counts"].decode("ascii")}, 1 if kind in ("disc", "ellipse") else 2
            ys, xs = np.nonzero(mask)
            anns.append({"id": ann_id, "image_id": i + 1, "category_id": cat, "segmentation": seg,
                         "area": float(mask.sum()), "iscrowd": 0,
                         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                  float(ys.max() - ys.min() + 1)]})
            ann_id += 1
        name = f"synth_{i + 1:06d}.png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(tmp / "images" / name)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    # a crowd region (ignored by the evaluation unless crowds are asked for)
    h, w = images[0]["height"], images[0]["width"]
    crowd = np.zeros((h, w), bool)
    crowd[:4, :4] = True
    anns.append({"id": ann_id, "image_id": 1, "category_id": 1, "segmentation": _rle_uncompressed(crowd),
                 "area": 16.0, "iscrowd": 1, "bbox": [0.0, 0.0, 4.0, 4.0]})
    with open(tmp / "annotations.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": CATEGORIES,
                   "info": {"description": f"fastzoo synthetic shapes, seed {seed}"}}, f)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out / "annotations.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None, metavar="HxW",
                   help="one image size for all images (default: a mix of small sizes)")
    a = p.parse_args(argv)
    if a.images < 1:
        p.error("--images must be >= 1")
    kw = {}
    if a.size:
        try:
            h, w = (int(v) for v in a.size.lower().split("x"))
        except ValueError:
            p.error(f"--size must be HxW, e.g. 480x640, found {a.size!r}")
        kw["sizes"] = ((h, w),)
    path = make_coco_synth(a.out_dir, a.images, a.seed, **kw)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
