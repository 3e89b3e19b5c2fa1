"""End-to-end demo that needs no download: the README's Quickstart runs it.

    python -m fastzoo.demo [--device cpu|cuda] [--image PATH]

With random weights (no checkpoint is fetched):
1. SAM vit_b segments a photo from one point prompt (``../shared/data/dog.jpg`` next to a
   clone of the repository when present, else a generated image) through the drop-in
   ``SamPredictor`` API;
2. a stories15M-shaped Llama generates a batch of two prompts of different lengths;
3. a ViT-B/16 classifies a batch of images, also with int8 dynamic quantization.
The outputs are meaningless (random weights); the timings and the code path are real.
On a GPU it runs in bf16, on a CPU in fp32.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

_DOG = Path(__file__).resolve().parents[2] / "shared" / "data" / "dog.jpg"


def _load_image(path: Path | None) -> tuple[np.ndarray, str]:
    from PIL import Image

    if path is not None:
        return np.asarray(Image.open(path).convert("RGB")), str(path)
    if _DOG.is_file():
        return np.asarray(Image.open(_DOG).convert("RGB")), str(_DOG)
    yy, xx = np.mgrid[0:480, 0:640]
    img = np.stack([(xx * 255 // 640), (yy * 255 // 480), ((xx + yy) % 256)], -1).astype(np.uint8)
    img[140:340, 220:420] = (200, 40, 40)
    return img, "a generated 640x480 image"


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


@torch.no_grad()
def demo_sam(device, dtype, image_path):
    from fastzoo.sam import SamPredictor, sam_model_registry

    image, name = _load_image(image_path)
    sam = sam_model_registry["vit_b"]().to(device=device, dtype=dtype).eval()
    predictor = SamPredictor(sam)
    _, t_embed = _timed(lambda: predictor.set_image(image), device)
    h, w = image.shape[:2]
    (masks, scores, _), t_pred = _timed(lambda: predictor.predict(
        point_coords=np.array([[w // 2, h // 2]]), point_labels=np.array([1]), multimask_output=True), device)
    print(f"SAM vit_b on {name} ({w}x{h}): image embedding {t_embed * 1e3:.0f} ms, 3 masks in "
          f"{t_pred * 1e3:.0f} ms, areas {[int(m.sum()) for m in masks]}, predicted IoU {', '.join(f'{s:.3f}' for s in scores)}")


@torch.no_grad()
def demo_llama(device, dtype):
    from fastzoo.llama.config import LlamaConfig
    from fastzoo.llama.generate import Generator
    from fastzoo.llama.model import Transformer

    torch.manual_seed(0)
    model = Transformer(LlamaConfig.from_preset("stories15m")).to(device=device, dtype=dtype).eval()
    prompts = [[1, 450, 4996, 17354, 1701, 29916], [1, 9038, 2501]]
    out = Generator(model).generate(prompts, 32, temperature=0.8, top_k=50)
    print(f"Llama stories15M shapes: 2 prompts (6 and 3 tokens) -> {[len(t) for t in out.tokens]} new tokens, "
          f"{len(prompts) * out.steps / max(out.decode_s, 1e-9):.0f} tokens/s, time to first token "
          f"{out.prefill_s * 1e3:.0f} ms")


@torch.no_grad()
def demo_vit(device, dtype):
    from fastzoo.vit import build_vit

    x = torch.randn(8, 3, 224, 224, device=device, dtype=dtype)
    for quant in (None, "int8dq"):
        model = build_vit("vit_base_patch16_224", dtype=dtype, device=device, quantize=quant)
        logits, t = _timed(lambda: model(x), device)
        print(f"ViT-B/16 {quant or str(dtype).split('.')[-1]}: 8 images in {t * 1e3:.0f} ms, "
              f"logits {tuple(logits.shape)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image", type=Path, default=None, help="an RGB image for SAM (default: dog.jpg or generated)")
    args = p.parse_args(argv)
    if args.image is not None and not args.image.is_file():
        p.error(f"image not found: {args.image}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but PyTorch sees no CUDA GPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"fastzoo demo on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU'} "
          f"({str(dtype).split('.')[-1]}, random weights)")
    demo_sam(device, dtype, args.image)
    demo_llama(device, dtype)
    demo_vit(device, dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
