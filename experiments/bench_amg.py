"""Automatic mask generation: fastzoo's fast pipeline against segment_anything's generator.

    python -m experiments.bench_amg            # vit_b, 32x32 grid, 2 timed runs each
    python -m experiments.bench_amg --quick    # 16x16 grid, 1 timed run, no fastzoo reference-path row

Both generators get the same model (random vit_b weights, or ``--checkpoint``) in fp32 and
the same image (``../shared/data/dog.jpg`` when present, else a generated 534x800 image):
wall time per image (after one warm-up run, synchronised) and peak GPU memory during
``generate`` (``peak_gib``; ``extra_gib`` = above the memory held before the call), the
number of masks, and whether fastzoo's masks equal the reference's. Rows: segment_anything;
fastzoo ``fast=True`` fp32; fastzoo ``fast=True`` bf16 (masks not compared); and, without
``--quick``, fastzoo's reference-order path. Random weights make near-identical low-quality
masks, so the default filters are loosened (predicted-IoU filter off, stability 0.2 at offset
0.05, recorded in the JSON); with ``--checkpoint`` SAM's defaults apply.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from experiments.harness import REPO_ROOT, print_table, require_cuda, save_result

DOG = REPO_ROOT.parent / "shared" / "data" / "dog.jpg"


def load_image(path: Path | None = None) -> tuple[np.ndarray, str]:
    from PIL import Image

    path = path or DOG
    if path.is_file():
        return np.array(Image.open(path).convert("RGB")), str(path)
    from experiments.coco_synth import make_coco_synth

    with tempfile.TemporaryDirectory() as d:
        ann = make_coco_synth(Path(d) / "one", n_images=1, seed=0, sizes=((534, 800),), shapes_per_image=(6, 9))
        img = np.array(Image.open(next((ann.parent / "images").glob("*.png"))).convert("RGB"))
    return img, "generated 534x800 (experiments.coco_synth, seed 0)"


def time_generate(gen, image, device, repeats: int) -> dict:
    cuda = device.type == "cuda"
    out = gen.generate(image)  # warm-up
    times, peaks, extras = [], [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = gen.generate(image)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            peaks.append(peak / 2**30)
            extras.append((peak - before) / 2**30)
    return {"s_per_image": statistics.median(times), "runs_s": times,
            "peak_gib": max(peaks) if peaks else None, "extra_gib": max(extras) if extras else None,
            "masks": len(out)}, out


def same_masks(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x["segmentation"] == y["segmentation"] and x["bbox"] == y["bbox"]
                                    for x, y in zip(a, b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16x16 grid, 1 timed run, no fastzoo reference-path row")
    p.add_argument("--model-type", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    p.add_argument("--checkpoint", help="official checkpoint (default: random weights)")
    p.add_argument("--image", type=Path, help=f"image (default {DOG} if present, else generated)")
    p.add_argument("--points-per-side", type=int, help="default 32 (16 with --quick)")
    p.add_argument("--points-per-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, help="timed runs per generator (default 2, 1 with --quick)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only for a smoke run")
    p.add_argument("--out-dir", help="results folder (default experiments/results/<gpu>)")
    a = p.parse_args(argv)
    device = require_cuda("bench_amg") if a.device == "cuda" else torch.device(a.device)
    pps = a.points_per_side or (16 if a.quick else 32)
    repeats = a.repeats or (1 if a.quick else 2)
    try:
        from segment_anything import SamAutomaticMaskGenerator as RefAMG
        from segment_anything import sam_model_registry as ref_registry
    except ImportError as e:
        print(f"error: bench_amg compares with segment_anything, which is not installed ({e})", file=sys.stderr)
        return 2
    from fastzoo.sam import SamAutomaticMaskGenerator, build_sam_model

    image, image_name = load_image(a.image)
    torch.manual_seed(0)
    ours = build_sam_model(a.model_type, a.checkpoint).to(device).eval()
    ref = ref_registry[a.model_type]()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref = ref.to(device).eval()
    if a.checkpoint:
        amg_kw = dict(points_per_side=pps, points_per_batch=a.points_per_batch)
    else:
        amg_kw = dict(points_per_side=pps, points_per_batch=a.points_per_batch, pred_iou_thresh=0.0,
                      stability_score_thresh=0.2, stability_score_offset=0.05)
    amg_kw["output_mode"] = "uncompressed_rle"
    rows = []
    with torch.no_grad():
        ref_fig, ref_out = time_generate(RefAMG(ref, **amg_kw), image, device, repeats)
        rows.append({"generator": "segment_anything", "dtype": "fp32", **ref_fig})
        del ref
        fig, out = time_generate(SamAutomaticMaskGenerator(ours, **amg_kw, fast=True), image, device, repeats)
        rows.append({"generator": "fastzoo fast", "dtype": "fp32", **fig, "same_masks_as_reference": same_masks(out, ref_out)})
        if not a.quick:
            fig, out = time_generate(SamAutomaticMaskGenerator(ours, **amg_kw), image, device, repeats)
            rows.append({"generator": "fastzoo reference path", "dtype": "fp32", **fig,
                         "same_masks_as_reference": same_masks(out, ref_out)})
        if device.type == "cuda":
            ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
            ours_bf16.prompt_encoder.pe_layer.float()
            ours_bf16.pixel_mean, ours_bf16.pixel_std = ours.pixel_mean.float(), ours.pixel_std.float()
            del ours
            fig, _ = time_generate(SamAutomaticMaskGenerator(ours_bf16, **amg_kw, fast=True), image, device, repeats)
            rows.append({"generator": "fastzoo fast", "dtype": "bf16", **fig})
    base = rows[0]["s_per_image"]
    for r in rows:
        r["speedup"] = base / r["s_per_image"]
        if r["peak_gib"] is not None and rows[0]["peak_gib"]:
            r["peak_ratio"] = r["peak_gib"] / rows[0]["peak_gib"]
    print_table(rows, ["generator", "dtype", "s_per_image", "speedup", "peak_gib", "extra_gib", "masks",
                       "same_masks_as_reference"])
    figures = {"rows": rows, "image": image_name, "image_hw": list(image.shape[:2]), "model_type": a.model_type,
               "weights": a.checkpoint or "random (torch.manual_seed(0))",
               "amg_kwargs": {k: v for k, v in amg_kw.items()}}
    name = "bench_amg_quick" if a.quick else "bench_amg"
    if device.type == "cuda" or a.out_dir:
        print(f"wrote {save_result(name, figures, a, out_dir=a.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
