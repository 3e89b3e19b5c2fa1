"""Prompt batching of SamPredictor.predict_torch over several images: loop vs packed vs nested.

    python -m experiments.bench_sam_prompts            # 16 images, JSON under experiments/results/<gpu>/
    python -m experiments.bench_sam_prompts --quick    # 8 images, few repeats, nothing saved

Random-weight vit_b SAM in bf16 (the prompt encoder and mask decoder are the same for every
encoder size), eager. The images are embedded once with ``set_torch_image``; then each image
gets a different number of prompts (seeded, 1..``--max-prompts``; one point, or one box, per
prompt) and ``predict_torch(num_prompts=..., batching=b)`` runs with each batching:

- ``loop``: one prompt-encoder + mask-decoder call per image (the baseline);
- ``packed``: all prompts in one call, embeddings gathered with an on-device index;
- ``nested``: all prompts in one call, embeddings broadcast through a ``torch.nested`` jagged tensor.

Timed (median of CUDA events, harness.bench): ``decode`` = prompt encoder + mask decoder only
(what the batching changes) and ``full`` = the whole ``predict_torch`` with ``return_logits``
(adds upsampling every mask to its image size, identical for all three). Also: prompts/s, speedup
over ``loop``, peak memory of one call, and the relative error of the low-res logits against loop.
"""
from __future__ import annotations

import argparse
import random

import torch

from experiments import harness
from fastzoo.sam import SamPredictor, build_sam_fast
from fastzoo.sam.predictor import BATCHING_MODES


def make_prompts(n_images, max_prompts, kind, img_size, device, seed):
    rng = random.Random(seed)
    counts = [rng.randint(1, max_prompts) for _ in range(n_images)]
    total = sum(counts)
    g = torch.Generator().manual_seed(seed)
    if kind == "points":
        coords = torch.rand(total, 1, 2, generator=g) * img_size
        labels = torch.ones(total, 1, dtype=torch.int32)
        return counts, dict(point_coords=coords.to(device), point_labels=labels.to(device))
    xy = torch.sort(torch.rand(total, 2, 2, generator=g) * img_size, dim=1).values.reshape(total, 4)
    return counts, dict(point_coords=None, point_labels=None, boxes=xy.to(device))


def decode_only(pred: SamPredictor, kw, counts, batching):
    """The prompt-encoder + mask-decoder part of ``predict_torch`` (no upsampling to image size)."""
    args = (kw.get("point_coords"), kw.get("point_labels"), kw.get("boxes"), None, True)
    if batching == "loop":
        out, start = [], 0
        for i, c in enumerate(counts):
            sl = [None if t is None else t[start:start + c] for t in args[:4]]
            out.append(pred._decode(*sl, True, pred.features[i:i + 1])[0])
            start += c
        return out
    return pred._decode(*args, pred._features_per_prompt(counts, batching))[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--max-prompts", type=int, default=32, help="prompts per image drawn from 1..N")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--quick", action="store_true", help="8 images, few repeats, no JSON")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    dev = harness.require_cuda("the SAM prompt-batching benchmark")
    n_images = 8 if args.quick else args.images
    rep, warmup = (5, 2) if args.quick else (20, 3)

    torch.manual_seed(0)
    sam = build_sam_fast("vit_b", device=dev, dtype=args.dtype, compile=False)
    pred = SamPredictor(sam)
    size = sam.image_encoder.img_size
    with torch.no_grad():
        images = torch.randint(0, 256, (n_images, 3, size, size), device=dev, dtype=torch.uint8)
        pred.set_torch_image(images, (size, size))

    rows, all_counts = [], {}
    for kind in ("points", "boxes"):
        counts, kw = make_prompts(n_images, args.max_prompts, kind, size, dev, seed=n_images)
        total = sum(counts)
        all_counts[kind] = counts
        with torch.no_grad():
            ref = torch.cat(pred.predict_torch(**kw, num_prompts=counts, batching="loop", return_logits=True)[2])
            times = {}
            for b in ("loop", *(m for m in BATCHING_MODES if m != "loop")):  # loop first: the baseline
                low = torch.cat(pred.predict_torch(**kw, num_prompts=counts, batching=b, return_logits=True)[2])
                t_dec = harness.bench(lambda: decode_only(pred, kw, counts, b), warmup=warmup, rep=rep, device=dev)
                t_full = harness.bench(
                    lambda: pred.predict_torch(**kw, num_prompts=counts, batching=b, return_logits=True),
                    warmup=warmup, rep=rep, device=dev)
                mem = harness.peak_memory(lambda: decode_only(pred, kw, counts, b), dev)
                times[b] = t_dec["median_ms"]
                rows.append({
                    "prompt": kind, "batching": b, "images": n_images, "prompts": total,
                    "decode_ms": t_dec["median_ms"], "decode_p10_ms": t_dec["p10_ms"],
                    "decode_p90_ms": t_dec["p90_ms"], "full_ms": t_full["median_ms"],
                    "prompts_per_s": total / (t_dec["median_ms"] * 1e-3),
                    "speedup_vs_loop": harness.speedup(times["loop"], t_dec["median_ms"]),
                    "peak_mem_gib": mem / 2**30,
                    "logits_rel_err_vs_loop": float((low.float() - ref.float()).norm() / ref.float().norm()),
                })
    harness.print_table(rows, ["prompt", "batching", "images", "prompts", "decode_ms", "full_ms", "prompts_per_s",
                               "speedup_vs_loop", "peak_mem_gib", "logits_rel_err_vs_loop"])
    if not args.quick:
        path = harness.save_result("bench_sam_prompts", {"rows": rows, "counts": all_counts}, args, args.out_dir)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
