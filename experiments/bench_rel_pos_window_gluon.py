"""SAM's windowed rel-pos attention layer: the Hopper Gluon kernel against the ``tl`` kernel, GPU only.

    python -m experiments.bench_rel_pos_window_gluon              # vit_b and vit_l heads, batch 16

The layer: ``rel_pos_window_attention(qkv, table_h, table_w, heads, window=14, pad=...)`` on a batch of
64 x 64 token grids (head_dim 64; vit_b 12 heads, vit_l 16): 25 windows of 14 x 14 an image, the grid
padded to 70 x 70 with the padding token's k and v (the qkv bias), the rel-pos products included. Timed
in the same run: ``rel_pos_window_attention_gluon`` against ``rel_pos_window_attention_triton`` (the
``tl`` kernel, autotuned), median ms of CUDA-event-timed calls, TFLOP/s = 4·B·heads·25·196²·64 / time
(the windows' own products, padding keys included, bias excluded), and the error against the fp32
reference on the first two images (``err``; ``ref_err``: the reference's own in bf16, the yardstick;
``tl_err``: the tl kernel's). JSON: rel_pos_window_gluon.json.
"""
from __future__ import annotations

import argparse

import torch

from experiments import harness
from experiments.bench_rel_pos_global_gluon import time_against_tl
from fastzoo.ops import rel_pos_attention_gluon as rpg
from fastzoo.ops.rel_pos_attention import rel_pos_window_attention_ref, rel_pos_window_attention_triton

WINDOW = rpg.WIN_SIZE


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", default="12,16", help="comma-separated head counts (vit_b 12, vit_l 16)")
    p.add_argument("--grid", type=int, default=64, help="token grid side (SAM: 64)")
    p.add_argument("--rep", type=int, default=30)
    p.add_argument("--name", default="rel_pos_window_gluon", help="the result's name")
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    args = p.parse_args(argv)
    try:
        heads_list = [int(h) for h in args.heads.split(",") if h.strip()]
    except ValueError:
        p.error(f"--heads expects comma-separated integers, got {args.heads!r}")
    device = harness.require_cuda("experiments/bench_rel_pos_window_gluon.py")
    probe = torch.zeros(1, 14, 14, 3 * 64, dtype=torch.bfloat16, device=device)
    if not rpg.window_attention_applies(probe, 1, WINDOW, None, 0.125):
        raise SystemExit("error: the Gluon window-attention kernel needs a Hopper GPU and Triton with Gluon "
                         f"(found {harness.gpu_name()})")
    rows = []
    B, G = args.batch, args.grid
    n_win = (-(-G // WINDOW)) ** 2
    for heads in heads_list:
        g = torch.Generator(device=device).manual_seed(heads)
        qkv = torch.randn(B, G, G, 3 * heads * 64, device=device, generator=g).bfloat16()
        th = (torch.randn(2 * WINDOW - 1, 64, device=device, generator=g) * 0.5).bfloat16()
        tw = (torch.randn(2 * WINDOW - 1, 64, device=device, generator=g) * 0.5).bfloat16()
        pad = torch.randn(3 * heads * 64, device=device, generator=g).bfloat16()
        cb = min(B, 2)
        truth = rel_pos_window_attention_ref(qkv[:cb].float(), th.float(), tw.float(), heads, WINDOW, 0.125,
                                             pad.float())
        scale = truth.abs().max().item()
        err_of = lambda out: (out[:cb].float() - truth).abs().max().item() / scale  # noqa: E731
        ref_err = err_of(rel_pos_window_attention_ref(qkv[:cb], th, tw, heads, WINDOW, 0.125, pad))
        flops = 4 * B * heads * n_win * (WINDOW * WINDOW) ** 2 * 64
        gluon = lambda: rpg.rel_pos_window_attention_gluon(qkv, th, tw, heads, WINDOW, 0.125, pad)  # noqa: E731
        tl_call = lambda: rel_pos_window_attention_triton(qkv, th, tw, heads, WINDOW, 0.125, pad)  # noqa: E731
        rows.append(time_against_tl({"heads": heads, "B": B, "grid": G}, gluon, tl_call, err_of, ref_err, flops,
                                    args.rep, f"heads {heads}"))
    print("saved", harness.save_result(args.name, {"rows": rows}, args, args.out_dir))


if __name__ == "__main__":
    main()
