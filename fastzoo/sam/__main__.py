"""Command line: ``python -m fastzoo.sam`` / ``fastzoo-sam``.

Prompted segmentation::

    fastzoo-sam --checkpoint sam_vit_h_4b8939.pth --image dog.jpg --point 400,300 \\
        --output mask.png --overlay overlay.png

Automatic mask generation (a PNG per mask and ``masks.json`` in the ``--output`` folder)::

    fastzoo-sam --checkpoint sam_vit_b_01ec64.pth --model-type vit_b --image dog.jpg --amg --output masks/

Every input is validated before any work is done; on bad input the command prints
``error: ...`` and exits with status 2 without writing anything.  Outputs are written to
temporary files and renamed into place.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """Bad user input: reported as ``error: <message>`` with exit status 2."""


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastzoo-sam", description="Segment Anything (fastzoo) from the command line.")
    p.add_argument("--checkpoint", required=True, help="SAM checkpoint (.pth), e.g. sam_vit_h_4b8939.pth")
    p.add_argument("--model-type", default="vit_h", help="vit_h (default), vit_l or vit_b")
    p.add_argument("--image", required=True, help="input image (jpg/png)")
    p.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]",
                   help="point prompt in pixels; label 1 (default) = foreground, 0 = background; repeatable")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="box prompt in pixels")
    p.add_argument("--multimask", action="store_true",
                   help="predict 3 candidate masks and keep the one with the highest predicted IoU")
    p.add_argument("--output", help="mask PNG (prompted mode) or output folder (--amg)")
    p.add_argument("--overlay", help="PNG/JPG of the image with the mask(s) and prompts drawn")
    p.add_argument("--amg", action="store_true", help="automatic mask generation over a grid of points")
    p.add_argument("--points-per-side", type=int, default=32, help="AMG: grid size (default 32)")
    p.add_argument("--points-per-batch", type=int, default=64, help="AMG: points per decoder batch (default 64)")
    p.add_argument("--pred-iou-thresh", type=float, default=0.88, help="AMG: predicted-IoU filter (default 0.88)")
    p.add_argument("--stability-score-thresh", type=float, default=0.95, help="AMG: stability filter (default 0.95)")
    p.add_argument("--fast-amg", action="store_true",
                   help="AMG: the on-device pipeline (SamAutomaticMaskGenerator(fast=True): same masks, no host "
                        "sync per point batch, bounded memory)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    return p.parse_args(argv)


def _floats(text: str, n: Tuple[int, ...], what: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) not in n or not all(np.isfinite(vals)):
        raise CLIError(f"{what} must be {' or '.join(str(k) for k in n)} comma-separated numbers, found {text!r}")
    return vals


def _load_image(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise CLIError(f"image not found: {path!r}")
    try:
        with Image.open(path) as im:
            im.load()
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise CLIError(f"cannot read image {path!r}: expected a JPEG or PNG file ({e})") from e


def _check_out(path: Optional[str], flag: str, is_dir: bool = False) -> Optional[Path]:
    if path is None:
        return None
    out = Path(path)
    if not out.parent.is_dir():
        raise CLIError(f"{flag}: folder {str(out.parent)!r} does not exist")
    if is_dir and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{flag}: {str(out)!r} exists and is not an empty folder")
    if not is_dir and out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise CLIError(f"{flag}: expected a .png or .jpg file name, found {str(out)!r}")
    return out


def _resolve_device_dtype(device: str, dtype: str) -> Tuple[torch.device, torch.dtype]:
    from .build import resolve_dtype

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"unknown device {device!r}: expected cpu, cuda or cuda:N") from e
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"unsupported device {device!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {device!r} requested but CUDA is not available")
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    try:
        return dev, resolve_dtype(dtype)
    except ValueError as e:
        raise CLIError(str(e)) from e


def _save_png_atomic(img, final: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=final.suffix)
    os.close(fd)
    try:
        img.save(tmp, format="PNG" if final.suffix.lower() == ".png" else "JPEG")
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _overlay(image: np.ndarray, masks: List[np.ndarray], points, labels, box):
    from PIL import Image, ImageDraw

    out = image.astype(np.float32)
    rng = np.random.default_rng(0)
    for i, m in enumerate(masks):
        color = np.array([30, 144, 255], np.float32) if len(masks) == 1 else rng.uniform(40, 255, 3).astype(np.float32)
        out[m] = 0.45 * out[m] + 0.55 * color
    im = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    r = max(3, min(image.shape[:2]) // 100)
    for (x, y), lab in zip(points, labels):
        fill = (0, 220, 0) if lab == 1 else (230, 0, 0)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255))
    if box is not None:
        draw.rectangle(list(box), outline=(0, 255, 0), width=max(2, r // 2))
    return im


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from .build import MODEL_TYPES, SamCheckpointError, build_sam_fast

    # ---- validate everything cheap before loading the model
    if args.model_type not in MODEL_TYPES:
        raise CLIError(f"unknown model type {args.model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
    device, dtype = _resolve_device_dtype(args.device, args.dtype)
    if not Path(args.checkpoint).is_file():
        raise CLIError(f"checkpoint not found: {args.checkpoint!r}")
    image = _load_image(args.image)
    h, w = image.shape[:2]
    points, labels = [], []
    for text in args.point:
        vals = _floats(text, (2, 3), "--point")
        x, y = vals[0], vals[1]
        lab = int(vals[2]) if len(vals) == 3 else 1
        if len(vals) == 3 and vals[2] not in (0.0, 1.0):
            raise CLIError(f"--point label must be 0 (background) or 1 (foreground), found {vals[2]:g}")
        if not (0 <= x < w and 0 <= y < h):
            raise CLIError(f"--point {text!r} is outside the image: expected 0 <= x < {w} and 0 <= y < {h}")
        points.append((x, y))
        labels.append(lab)
    box = None
    if args.box is not None:
        box = _floats(args.box, (4,), "--box")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise CLIError(
                f"--box {args.box!r} is outside the image or empty: expected 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}"
            )
    if args.amg:
        if points or box is not None:
            raise CLIError("--amg takes no --point/--box prompts")
        if args.points_per_side < 1 or args.points_per_batch < 1:
            raise CLIError("--points-per-side and --points-per-batch must be >= 1")
    elif not points and box is None:
        raise CLIError("give at least one --point or a --box (or --amg for automatic masks)")
    output = _check_out(args.output, "--output", is_dir=args.amg)
    overlay = _check_out(args.overlay, "--overlay")
    if output is None and overlay is None:
        raise CLIError("nothing to write: give --output and/or --overlay")

    # ---- model
    t0 = time.perf_counter()
    try:
        sam = build_sam_fast(args.model_type, args.checkpoint, device=device, dtype=dtype, compile=args.compile)
    except SamCheckpointError as e:
        raise CLIError(str(e)) from e
    t_load = time.perf_counter() - t0
    print(f"loaded {args.model_type} on {device} ({str(dtype).removeprefix('torch.')}) in {t_load:.2f}s")

    if args.amg:
        return _run_amg(args, sam, image, output, overlay)

    from .predictor import SamPredictor

    predictor = SamPredictor(sam)
    t0 = time.perf_counter()
    predictor.set_image(image)
    _sync(device)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    masks, scores, _ = predictor.predict(
        point_coords=np.array(points) if points else None,
        point_labels=np.array(labels) if points else None,
        box=np.array(box) if box is not None else None,
        multimask_output=args.multimask,
    )
    t_pred = time.perf_counter() - t0
    best = int(np.argmax(scores))
    mask = masks[best]
    print(f"image embedding {t_embed * 1000:.1f} ms, mask prediction {t_pred * 1000:.1f} ms")
    print(f"predicted IoU: {', '.join(f'{s:.3f}' for s in scores)}" + (f" (kept mask {best})" if len(scores) > 1 else ""))
    print(f"mask area: {int(mask.sum())} px of {h * w}")
    # Render everything before writing anything, so a failure leaves no partial output.
    ov = _overlay(image, [mask], points, labels, box) if overlay is not None else None
    if output is not None:
        _save_png_atomic(Image.fromarray(mask.astype(np.uint8) * 255), output)
        print(f"wrote {output}")
    if ov is not None:
        _save_png_atomic(ov, overlay)
        print(f"wrote {overlay}")
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_amg(args, sam, image: np.ndarray, output: Optional[Path], overlay: Optional[Path]) -> int:
    from PIL import Image

    from .automatic_mask_generator import SamAutomaticMaskGenerator
    from .utils.amg import rle_to_mask

    gen = SamAutomaticMaskGenerator(
        sam,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        output_mode="uncompressed_rle",
        fast=args.fast_amg,
    )
    t0 = time.perf_counter()
    anns = gen.generate(image, progress=True)
    _sync(sam.device)
    print(f"automatic mask generation: {len(anns)} masks in {time.perf_counter() - t0:.2f}s")
    masks = [rle_to_mask(a["segmentation"]) for a in anns]
    ov = None
    if overlay is not None:  # rendered before anything is written
        order = np.argsort([-a["area"] for a in anns])
        ov = _overlay(image, [masks[i] for i in order], [], [], None)
    if output is not None:
        from .utils.amg import coco_encode_rle

        tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
        try:
            records = []
            for i, (a, m) in enumerate(zip(anns, masks)):
                name = f"mask_{i:04d}.png"
                Image.fromarray(m.astype(np.uint8) * 255).save(tmp / name)
                records.append(
                    {
                        "id": i,
                        "file": name,
                        "bbox": a["bbox"],
                        "area": a["area"],
                        "predicted_iou": a["predicted_iou"],
                        "stability_score": a["stability_score"],
                        "point_coords": a["point_coords"],
                        "crop_box": a["crop_box"],
                        "rle": coco_encode_rle(a["segmentation"]),
                    }
                )
            (tmp / "masks.json").write_text(json.dumps({"image": str(args.image), "masks": records}, indent=1))
            if output.exists():
                output.rmdir()  # validated empty
            os.replace(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"wrote {len(records)} masks and masks.json to {output}")
    if ov is not None:
        _save_png_atomic(ov, overlay)
        print(f"wrote {overlay}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        return run(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
