"""SAM on a COCO-format instance-segmentation dataset: one point per object, mIoU and img/s.

    # COCO val2017 with the official vit_h checkpoint, bf16, compiled encoder, 8 images per encoder call
    python -m experiments.sam_eval --images coco/val2017 --annotations coco/annotations/instances_val2017.json \\
        --model-type vit_h --checkpoint sam_vit_h_4b8939.pth --dtype bf16 --compile on --batch-size 8
    # no dataset at hand: a generated one (random weights unless --checkpoint)
    python -m experiments.sam_eval --synthetic 64 --model-type vit_b
    # data parallel over 8 GPUs (one report, from rank 0)
    torchrun --standalone --nproc-per-node 8 -m experiments.sam_eval --images ... --annotations ...

As in the SAM paper (appendix D.1), every non-crowd annotation gets one foreground point, the
pixel farthest from the object boundary (exact Euclidean distance transform; ties go to the
first such pixel in row-major order). The images of a batch are embedded in one encoder call
(``SamPredictor.set_images``) and their prompts decoded together (``predict_torch`` with
``num_prompts``; ``--prompt-batch K`` caps a decoder call at K prompts, 1 = one prompt per
call as in the original predictor loop). Figures: mIoU of the best of the three multimask
outputs against the ground truth (``miou_oracle``), of the output with the highest predicted
IoU (``miou_top``) and of the single-mask output (``miou_single``); images per second over
the timed batches (after ``--warmup`` batches, data loading overlapped by ``--workers``
processes); peak GPU memory. Writes ``<name>.json`` (``experiments.harness.save_result``) and
``<name>.csv`` (one row per annotation). Exit status 2 on bad input, 3 when an option
(``--quantize``, ``--kernel``, ...) is refused by ``build_sam_fast`` or the tiny test model.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastzoo.utils import torchrun_env

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
#: A reduced encoder for tests on the CPU (random weights, fp32 only).
TINY_CONFIG = dict(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=(1,))
#: COCO-like image sizes for ``--synthetic``.
SYNTH_SIZES = ((480, 640), (427, 640), (640, 480), (512, 512))
CSV_COLUMNS = ("image_id", "ann_id", "area", "point_x", "point_y", "iou_oracle", "iou_top", "iou_single")


class EvalError(Exception):
    """Bad input: ``error: <message>``, exit status 2."""


class Unavailable(Exception):
    """A requested option is not available (refused by ``build_sam_fast``, or not for the tiny
    test model): ``unavailable: <message>``, exit status 3."""


# ----------------------------------------------------------------------------- prompts
def _axis_distance(bg: torch.Tensor) -> torch.Tensor:
    """Distance along dim 0 to the nearest background pixel (``bg`` True), float32 (exact integers)."""
    b = bg.numpy()
    n = b.shape[0]
    idx = np.arange(n)[:, None]
    above = np.maximum.accumulate(np.where(b, idx, -2 * n - 2), axis=0)
    below = np.minimum.accumulate(np.where(b, idx, 2 * n + 2)[::-1], axis=0)[::-1]
    return torch.from_numpy(np.minimum(idx - above, below - idx).astype(np.float32))


def _row_pass(g2: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """Exact squared distances of pixels ``(rows, cols)``: ``min_k g2[row, k] + (col - k)^2``."""
    W = g2.shape[1]
    k = torch.arange(W, dtype=torch.float32)
    out = torch.empty(rows.numel())
    step = max(1, chunk // W)
    for s in range(0, rows.numel(), step):
        r, c = rows[s : s + step], cols[s : s + step].float()
        out[s : s + step] = (g2[r] + (c[:, None] - k[None]) ** 2).amin(-1)
    return out


def squared_distance_to_background(mask: torch.Tensor) -> torch.Tensor:
    """Exact squared Euclidean distance of every pixel to the nearest pixel outside ``mask``
    (pixels beyond the image border count as outside); 0 outside the mask. int64, same shape.

    Separable: the distance along the column to the nearest background pixel, then along each
    row ``min_k g[i, k]^2 + (j - k)^2`` (brute force over k). float32 holds these integer
    squares exactly up to 2^24 (images up to ~2900 pixels a side).
    """
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, found shape {tuple(mask.shape)}")
    bg = ~F.pad(mask.bool(), (1, 1, 1, 1), value=False)
    H, W = bg.shape
    g2 = _axis_distance(bg) ** 2
    rows, cols = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    return _row_pass(g2, rows, cols).view(H, W)[1:-1, 1:-1].long()


def farthest_point(mask: np.ndarray | torch.Tensor) -> tuple[int, int] | None:
    """``(x, y)`` of the pixel of ``mask`` farthest from its boundary (the first in row-major
    order among ties), or ``None`` for an empty mask; exact Euclidean distances.

    Fast without computing the whole transform: within the mask's bounding box (+1 pixel),
    ``min(vertical, horizontal)^2`` bounds the squared distance from above; the exact distance
    of the pixel with the largest bound bounds the maximum from below, and only pixels whose
    upper bound reaches it (which include every maximum) get their exact distance.
    """
    m = torch.as_tensor(np.asarray(mask)).bool()
    ys = m.any(1).nonzero()
    if ys.numel() == 0:
        return None
    xs = m.any(0).nonzero()
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    bg = ~F.pad(m[y0:y1, x0:x1], (1, 1, 1, 1), value=False)
    g2 = _axis_distance(bg) ** 2
    upper = torch.minimum(g2, _axis_distance(bg.t().contiguous()).t() ** 2)
    W = bg.shape[1]
    best = int(upper.flatten().argmax())
    lower = _row_pass(g2, torch.tensor([best // W]), torch.tensor([best % W]))[0]
    cand = (upper.flatten() >= lower).nonzero()[:, 0]  # row-major order
    d2 = _row_pass(g2, cand // W, cand % W)
    idx = int(cand[int(d2.argmax())])  # first maximum
    return x0 + idx % W - 1, y0 + idx // W - 1


# ----------------------------------------------------------------------------- data
class CocoPoints(torch.utils.data.Dataset):
    """Images of a COCO-format dataset with their ground-truth masks and one point per mask."""

    def __init__(self, images_dir: str | os.PathLike, annotations: str | os.PathLike,
                 include_crowd: bool = False, limit: int | None = None) -> None:
        from pycocotools.coco import COCO

        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise EvalError(f"images folder not found: {str(images_dir)!r}")
        if not Path(annotations).is_file():
            raise EvalError(f"annotations file not found: {str(annotations)!r}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco = COCO(str(annotations))
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            raise EvalError(f"cannot read {str(annotations)!r} as COCO annotations (images, annotations): {e}") from e
        self.include_crowd = include_crowd
        ids = []
        for img_id in sorted(self.coco.getImgIds()):
            anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id, iscrowd=None if include_crowd else False))
            if anns:
                ids.append(img_id)
        self.ids = ids[:limit] if limit else ids
        if not self.ids:
            raise EvalError(f"no image with a usable annotation in {str(annotations)!r}")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image

        img_id = self.ids[i]
        info = self.coco.loadImgs(img_id)[0]
        path = self.images_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                image = np.array(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot read image {str(path)!r} (image id {img_id}): {e}") from e
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id, iscrowd=None if self.include_crowd else False))
        masks, points, ann_ids, areas = [], [], [], []
        for ann in sorted(anns, key=lambda a: a["id"]):
            m = self.coco.annToMask(ann).astype(bool)
            if m.shape != image.shape[:2]:
                raise EvalError(f"annotation {ann['id']} has a {m.shape} mask for a {image.shape[:2]} image {str(path)!r}")
            p = farthest_point(m)
            if p is None:
                continue  # empty after rasterisation
            masks.append(m)
            points.append(p)
            ann_ids.append(int(ann["id"]))
            areas.append(int(m.sum()))
        return {
            "image_id": img_id,
            "image": image,
            "masks": np.stack(masks) if masks else np.zeros((0, *image.shape[:2]), bool),
            "points": np.array(points, dtype=np.float64).reshape(-1, 2),
            "ann_ids": ann_ids,
            "areas": areas,
        }


def _collate(items):
    return items


# ----------------------------------------------------------------------------- model
def build_model(args) -> torch.nn.Module:
    """The SAM of ``args`` via ``build_sam_fast`` (quantize / kernel passed only where given)."""
    from fastzoo.sam import build_sam_fast, build_sam_from_config

    torch.manual_seed(args.seed)  # random weights (no checkpoint) equal on every rank
    device = torch.device(args.device)
    if args.model_type == "tiny":
        for opt, val, default in (("dtype", args.dtype, "fp32"), ("compile", args.compile, "off"),
                                  ("quantize", args.quantize, None), ("kernel", args.kernel, None)):
            if val != default:
                raise Unavailable(f"--model-type tiny (a test model) supports only the defaults; found --{opt} {val}")
        return build_sam_from_config(**TINY_CONFIG, image_size=args.image_size).to(device).eval().requires_grad_(False)
    kw: dict[str, Any] = dict(device=device, dtype=args.dtype,
                              compile=args.compile == "on" if args.compile in ("off", "on") else args.compile)
    kw.update({opt: getattr(args, opt) for opt in ("quantize", "kernel") if getattr(args, opt) is not None})
    try:
        return build_sam_fast(args.model_type, args.checkpoint, **kw)
    except (ValueError, NotImplementedError, ImportError) as e:
        if args.quantize or args.kernel or args.compile not in ("off", "on"):
            raise Unavailable(f"build_sam_fast refused {kw}: {e}") from e
        raise EvalError(str(e)) from e


# ----------------------------------------------------------------------------- evaluation
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mask_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks ``pred`` (N, K, H, W) with ``gt`` (N, H, W): (N, K) float32.
    Two empty masks have IoU 1."""
    inter = (pred & gt[:, None]).flatten(2).sum(-1)
    union = (pred | gt[:, None]).flatten(2).sum(-1)
    return torch.where(union > 0, inter / union.clamp_min(1), 1.0).float()


@torch.no_grad()
def _predict_batch(predictor, batch, prompt_batch: int, single_mask: bool, device: torch.device, pad_to: int = 0):
    """Per-annotation IoU tensors (on the device) for one batch of images.

    ``pad_to``: repeat the last image (with no prompts) up to that many images, so that a
    compiled encoder sees one batch size (a short last batch would recompile it)."""
    pad = max(0, pad_to - len(batch))
    predictor.set_images([it["image"] for it in batch] + [batch[-1]["image"]] * pad)
    counts = [len(it["ann_ids"]) for it in batch] + [0] * pad
    coords = np.concatenate([predictor.transform.apply_coords(it["points"], it["image"].shape[:2]) for it in batch])
    coords_t = torch.as_tensor(coords, dtype=torch.float, device=device)[:, None, :]
    labels_t = torch.ones(coords_t.shape[0], 1, dtype=torch.int, device=device)
    # calls: (start, counts per image) covering all prompts
    calls = []
    if prompt_batch <= 0:
        calls.append((0, counts))
    else:
        start = 0
        for i, c in enumerate(counts):
            for s in range(0, c, prompt_batch):
                n = min(prompt_batch, c - s)
                calls.append((start + s, [n if j == i else 0 for j in range(len(counts))]))
            start += c
    per_image: list[list[tuple]] = [[] for _ in counts]
    for start, num in calls:
        n = sum(num)
        sl = slice(start, start + n)
        masks, ious, _ = predictor.predict_torch(coords_t[sl], labels_t[sl], multimask_output=True, num_prompts=num)
        single = (predictor.predict_torch(coords_t[sl], labels_t[sl], multimask_output=False, num_prompts=num)[0]
                  if single_mask else [None] * len(num))
        for i, c in enumerate(num):
            if c:
                per_image[i].append((masks[i], ious[i], single[i]))
    out = []
    for i, it in enumerate(batch):
        gt = torch.from_numpy(it["masks"]).to(device, non_blocking=True)
        masks = torch.cat([p[0] for p in per_image[i]])
        pred_iou = torch.cat([p[1] for p in per_image[i]])
        iou = mask_iou(masks, gt)
        row = [iou.amax(1), iou.gather(1, pred_iou.argmax(1, keepdim=True))[:, 0]]
        if single_mask:
            row.append(mask_iou(torch.cat([p[2] for p in per_image[i]]), gt)[:, 0])
        else:
            row.append(torch.full_like(row[0], float("nan")))
        out.append(torch.stack(row, 1))
    return out


def evaluate(args, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Run this rank's share; return its rows and timings."""
    from tqdm import tqdm

    from fastzoo.sam import SamPredictor

    device = torch.device(args.device)
    ds = CocoPoints(args.images, args.annotations, include_crowd=args.include_crowd, limit=args.limit)
    n_total = len(ds)
    shard = torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))
    loader = torch.utils.data.DataLoader(shard, batch_size=args.batch_size, collate_fn=_collate,
                                         num_workers=args.workers, persistent_workers=False)
    t0 = time.perf_counter()
    model = build_model(args)
    predictor = SamPredictor(model)
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    results, meta = [], []
    timed_images = 0
    warmup_s = 0.0
    wait_s = 0.0
    t_start = time.perf_counter()
    t_timed = None
    bar = tqdm(total=len(shard), desc=f"SAM eval ({args.model_type})", unit="img", disable=rank != 0 or args.no_progress)
    it_loader = iter(loader)
    b = 0
    while True:
        tw = time.perf_counter()
        try:
            batch = next(it_loader)
        except StopIteration:
            break
        fetched = len(batch)
        batch = [it for it in batch if it["ann_ids"]]
        if b == args.warmup:
            _sync(device)
            t_timed = time.perf_counter()
            warmup_s = t_timed - t_start
        if t_timed is not None:
            wait_s += time.perf_counter() - tw
        if batch:
            pad_to = args.batch_size if args.compile != "off" else 0
            results.extend(_predict_batch(predictor, batch, args.prompt_batch, args.single_mask, device, pad_to))
            for it in batch:
                meta.extend((it["image_id"], a, ar, float(x), float(y))
                            for a, ar, (x, y) in zip(it["ann_ids"], it["areas"], it["points"]))
            if t_timed is not None:
                timed_images += len(batch)
        b += 1
        bar.update(fetched)
    _sync(device)
    t_end = time.perf_counter()
    bar.close()
    if t_timed is None:  # fewer batches than --warmup: nothing timed
        t_timed, warmup_s = t_end, t_end - t_start
    ious = torch.cat(results).cpu().tolist() if results else []
    rows = [dict(zip(CSV_COLUMNS, (*m, *v))) for m, v in zip(meta, ious)]
    return {
        "rows": rows,
        "n_images_total": n_total,
        "n_images": len(shard),
        "timed_images": timed_images,
        "timed_s": t_end - t_timed,
        "warmup_s": warmup_s,
        "data_wait_s": wait_s,
        "build_s": build_s,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
    }


def summarize(parts: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Figures of the whole run from the ranks' parts (rank order)."""
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: (r["image_id"], r["ann_id"]))

    def mean(key):
        vals = [r[key] for r in rows if r[key] == r[key]]
        return sum(vals) / len(vals) if vals else None

    timed = sum(p["timed_images"] for p in parts)
    timed_s = max(p["timed_s"] for p in parts)
    mems = [p["peak_memory_bytes"] for p in parts if p["peak_memory_bytes"] is not None]
    figs = {
        "images": sum(p["n_images"] for p in parts),
        "annotations": len(rows),
        "miou_oracle": mean("iou_oracle"),
        "miou_top": mean("iou_top"),
        "miou_single": mean("iou_single"),
        "img_per_s": timed / timed_s if timed and timed_s > 0 else None,
        "timed_images": timed,
        "timed_s": timed_s,
        "warmup_s": max(p["warmup_s"] for p in parts),
        "data_wait_s": max(p["data_wait_s"] for p in parts),
        "build_s": max(p["build_s"] for p in parts),
        "peak_memory_gib": max(mems) / 2**30 if mems else None,
        "world_size": len(parts),
    }
    if len(parts) > 1:
        figs["per_rank_img_per_s"] = [p["timed_images"] / p["timed_s"] if p["timed_s"] > 0 else None for p in parts]
    return figs, rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(f.name, path)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.sam_eval", description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--images", help="folder of the dataset's images (e.g. coco/val2017)")
    d.add_argument("--annotations", help="COCO-format annotations JSON (e.g. instances_val2017.json)")
    d.add_argument("--synthetic", type=int, metavar="N",
                   help="evaluate on N generated images (experiments.coco_synth, COCO-like sizes) instead")
    d.add_argument("--limit", type=int, help="first N images (with annotations) only")
    d.add_argument("--include-crowd", action="store_true", help="also prompt iscrowd=1 annotations")
    d.add_argument("--workers", type=int, default=4,
                   help="data-loading processes (decode masks, compute points; default 4)")
    m = p.add_argument_group("model")
    m.add_argument("--model-type", default="vit_h", choices=("vit_h", "vit_l", "vit_b", "tiny"),
                   help="SAM size (tiny: a small random test model, fp32)")
    m.add_argument("--checkpoint", help="official SAM checkpoint; without it the weights are random")
    m.add_argument("--image-size", type=int, default=256, help="encoder input size of --model-type tiny")
    m.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda when available)")
    m.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="default bf16 on CUDA, fp32 on the CPU")
    m.add_argument("--compile", default="off", choices=("off", "on", "regional", "full"),
                   help="torch.compile: off, on (the tree's default compile), regional, full")
    m.add_argument("--quantize", default=None, choices=("int8", "sparse", "int8+sparse"),
                   help="passed to build_sam_fast(quantize=...) (only when given)")
    m.add_argument("--kernel", default=None, choices=("sdpa", "fused"),
                   help="encoder attention: passed to build_sam_fast(kernel=...) (only when given)")
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=1, help="images per encoder call (default 1)")
    r.add_argument("--prompt-batch", type=int, default=0,
                   help="prompts per decoder call: 0 = all prompts of the batch in one call (default), 1 = one by one")
    r.add_argument("--no-single-mask", dest="single_mask", action="store_false",
                   help="skip the single-mask prediction (miou_single)")
    r.add_argument("--warmup", type=int, default=1, help="batches run before timing starts (default 1)")
    r.add_argument("--seed", type=int, default=0, help="seed of random weights")
    r.add_argument("--out-dir", help="results folder (default experiments/results/<gpu>)")
    r.add_argument("--name", help="result name (default sam_eval_<model>_<dtype>_...)")
    r.add_argument("--no-save", action="store_true", help="print only, write no JSON/CSV")
    r.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.synthetic is None and not (a.images and a.annotations):
        p.error("give --images and --annotations, or --synthetic N")
    if a.synthetic is not None and (a.images or a.annotations):
        p.error("--synthetic replaces --images/--annotations: give one or the other")
    for k in ("batch_size", "synthetic", "limit"):
        v = getattr(a, k)
        if v is not None and v < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, found {v}")
    if a.prompt_batch < 0 or a.warmup < 0 or a.workers < 0:
        p.error("--prompt-batch, --warmup and --workers must be >= 0")
    if a.checkpoint and a.model_type == "tiny":
        p.error("--model-type tiny has random weights only")
    return a


def default_name(a) -> str:
    parts = ["sam_eval", a.model_type, a.dtype, f"compile-{a.compile}", f"bs{a.batch_size}"]
    if a.prompt_batch:
        parts.append(f"pb{a.prompt_batch}")
    if a.quantize:
        parts.append(a.quantize.replace("+", "-"))
    if a.kernel:
        parts.append(a.kernel)
    if a.synthetic:
        parts.append(f"synthetic{a.synthetic}")
    return "_".join(parts)


def _run(a, rank: int, world: int) -> int:
    import torch.distributed as dist

    from experiments.harness import gpu_name, print_table, results_dir, save_result

    part = evaluate(a, rank, world)
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, part)
    else:
        parts = [part]
    if rank != 0:
        return 0
    figs, rows = summarize(parts)
    figs["device"] = gpu_name() if torch.device(a.device).type == "cuda" else "cpu"
    if a.checkpoint is None:
        figs["note"] = "random weights: the mIoU figures are meaningless"
    print_table([{k: figs[k] for k in ("images", "annotations", "miou_oracle", "miou_top", "miou_single",
                                        "img_per_s", "peak_memory_gib", "warmup_s")}])
    if not a.no_save:
        name = a.name or default_name(a)
        path = save_result(name, figs, a, out_dir=a.out_dir)
        write_csv(results_dir(a.out_dir) / f"{name}.csv", rows)
        print(f"wrote {path} and {path.with_suffix('.csv').name}")
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    tr = torchrun_env()
    rank, world, local_rank = tr if tr else (0, 1, 0)
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("error: --device cuda asked for but no CUDA GPU is visible", file=sys.stderr)
            return EXIT_BAD_INPUT
        if torch.device(a.device).index is None:
            a.device = f"cuda:{local_rank if tr else torch.cuda.current_device()}"
        torch.cuda.set_device(torch.device(a.device))
    if a.dtype is None:
        a.dtype = "bf16" if a.device.startswith("cuda") else "fp32"
    if tr:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("nccl" if a.device.startswith("cuda") else "gloo",
                                rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    tmp = None
    try:
        if a.synthetic is not None:
            from experiments.coco_synth import make_coco_synth

            if tr:  # one dataset for all ranks: generated by rank 0, path broadcast
                import torch.distributed as dist

                box = [None]
                if rank == 0:
                    tmp = tempfile.mkdtemp(prefix="sam_eval_synth.")
                    box = [str(make_coco_synth(Path(tmp) / "data", a.synthetic, a.seed, sizes=SYNTH_SIZES))]
                dist.broadcast_object_list(box, src=0)
                ann = Path(box[0])
            else:
                tmp = tempfile.mkdtemp(prefix="sam_eval_synth.")
                ann = make_coco_synth(Path(tmp) / "data", a.synthetic, a.seed, sizes=SYNTH_SIZES)
            a.images, a.annotations = str(ann.parent / "images"), str(ann)
        return _run(a, rank, world)
    except EvalError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Unavailable as e:
        if rank == 0:
            print(f"unavailable: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        if tr:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
