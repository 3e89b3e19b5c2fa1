"""SAM's global rel-pos attention layer: the Hopper Gluon kernel against the ``tl`` kernel, GPU only.

    python -m experiments.bench_rel_pos_global_gluon                    # the default tile, vit_b and vit_l heads
    python -m experiments.bench_rel_pos_global_gluon --tiles 2x3,2x3r0,2x2r128,1x3   # ROWSxSTAGES[rMAXNREG], each forced

The layer: ``rel_pos_window_attention(qkv, table_h, table_w, heads, window=0)`` on a batch of 64 x 64
token grids (head_dim 64; vit_b 12 heads, vit_l 16), from the (B, 64, 64, 3·heads·64) qkv grid, the
rel-pos products included. For each tile (grid rows of queries a program x K/V ring slots, optionally
a register cap), timed in the same run against ``rel_pos_window_attention_triton`` (the ``tl``
kernel, autotuned): median ms of CUDA-event-timed calls, TFLOP/s = 4·B·heads·4096²·64 / time, and
the error against the fp32 reference on the first two images (``err``; ``ref_err``: the reference's
own in bf16, the yardstick; ``tl_err``: the tl kernel's). JSON: rel_pos_global_gluon_tiles.json.
"""
from __future__ import annotations

import argparse
import re

import torch

from experiments import harness
from fastzoo.ops import rel_pos_attention_gluon as rpg
from fastzoo.ops.rel_pos_attention import rel_pos_window_attention_ref, rel_pos_window_attention_triton


def parse_tile(text: str) -> tuple[int, int, int | None]:
    """(rows, stages, register cap): no ``r`` suffix is the kernel's own cap (``MAXNREG``), ``r0`` none."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:r(\d+))?", text.strip())
    if m is None or int(m.group(1)) not in (1, 2, 4) or int(m.group(2)) < 2:
        raise ValueError(f"--tiles expects ROWSxSTAGES[rMAXNREG] with ROWS 1, 2 or 4 (grid rows of queries a "
                         f"program, dividing the grid's 64), STAGES >= 2 and MAXNREG a register cap (0: none; "
                         f"absent: the kernel's {rpg.MAXNREG}), e.g. 2x3, 2x2r128, 2x3r0; got {text!r}")
    return int(m.group(1)), int(m.group(2)), (int(m.group(3)) or None) if m.group(3) else rpg.MAXNREG


def time_against_tl(row: dict, gluon, tl_call, err_of, ref_err: float, flops: float, rep: int, label: str) -> dict:
    """``row`` with the Gluon kernel's and the ``tl`` kernel's errors (``err_of`` of each output), median ms of
    ``rep`` timed calls, TFLOP/s (``flops`` a call) and speedup, printed under ``label``."""
    row.update(err=err_of(gluon()), tl_err=err_of(tl_call()), ref_err=ref_err,
               gluon_ms=harness.bench(gluon, rep=rep)["median_ms"], tl_ms=harness.bench(tl_call, rep=rep)["median_ms"])
    row["gluon_tflops"] = flops / row["gluon_ms"] / 1e9
    row["tl_tflops"] = flops / row["tl_ms"] / 1e9
    row["speedup"] = row["tl_ms"] / row["gluon_ms"]
    print(f"  {label}: gluon {row['gluon_ms']:.3f} ms ({row['gluon_tflops']:.0f} TFLOP/s), tl {row['tl_ms']:.3f} ms, "
          f"x{row['speedup']:.3f}, err {row['err']:.2e} (tl {row['tl_err']:.2e}, ref {ref_err:.2e})", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", default="12,16", help="comma-separated head counts (vit_b 12, vit_l 16)")
    p.add_argument("--tiles", default=f"{rpg.QUERY_ROWS}x{rpg.STAGES}")
    p.add_argument("--rep", type=int, default=30)
    p.add_argument("--out-dir", default=None, help="results folder (default experiments/results/<gpu>/)")
    args = p.parse_args(argv)
    try:
        tiles = [parse_tile(t) for t in args.tiles.split(",") if t.strip()]
        heads_list = [int(h) for h in args.heads.split(",") if h.strip()]
    except ValueError as e:
        p.error(str(e))
    device = harness.require_cuda("experiments/bench_rel_pos_global_gluon.py")
    probe = torch.zeros(1, 64, 64, 3 * 64, dtype=torch.bfloat16, device=device)
    if not rpg.global_attention_applies(probe, 1, 0, None):
        raise SystemExit("error: the Gluon global-attention kernel needs a Hopper GPU and Triton with Gluon "
                         f"(found {harness.gpu_name()})")
    rows = []
    B = args.batch
    for heads in heads_list:
        g = torch.Generator(device=device).manual_seed(heads)
        qkv = torch.randn(B, 64, 64, 3 * heads * 64, device=device, generator=g).bfloat16()
        th = (torch.randn(127, 64, device=device, generator=g) * 0.5).bfloat16()
        tw = (torch.randn(127, 64, device=device, generator=g) * 0.5).bfloat16()
        cb = min(B, 2)
        truth = rel_pos_window_attention_ref(qkv[:cb].float(), th.float(), tw.float(), heads, 0)
        scale = truth.abs().max().item()
        err_of = lambda out: (out[:cb].float() - truth).abs().max().item() / scale  # noqa: E731
        ref_err = err_of(rel_pos_window_attention_ref(qkv[:cb], th, tw, heads, 0))
        flops = 4 * B * heads * 4096 ** 2 * 64
        for qr, stages, maxnreg in tiles:
            gluon = lambda: rpg.rel_pos_global_attention_gluon(qkv, th, tw, heads, 0.125, stages, qr, maxnreg)  # noqa: E731
            tl_call = lambda: rel_pos_window_attention_triton(qkv, th, tw, heads, 0, 0.125)  # noqa: E731
            row = {"heads": heads, "B": B, "tile": f"{qr}x{stages}r{maxnreg or 0}"}
            rows.append(time_against_tl(row, gluon, tl_call, err_of, ref_err, flops, args.rep,
                                        f"heads {heads} tile {row['tile']}"))
    print("saved", harness.save_result("rel_pos_global_gluon_tiles", {"rows": rows}, args, args.out_dir))


if __name__ == "__main__":
    main()
