"""The SAM technique waterfall: img/s, memory and mIoU as techniques are added, one process each.

    # COCO val2017, official vit_h checkpoint
    python -m experiments.sam_waterfall --images coco/val2017 --annotations coco/annotations/instances_val2017.json \\
        --model-type vit_h --checkpoint sam_vit_h_4b8939.pth --limit 500
    # no COCO: generated images, random weights (throughput and memory only)
    python -m experiments.sam_waterfall --synthetic 64 --model-type vit_h

Every technique is a set of ``experiments.sam_eval`` flags run in a fresh process (no state
carried over: compile caches, allocator, quantized modules). Techniques build on the last one
that ran: fp32 (one image per encoder call, one prompt per decoder call) -> bf16 -> compile ->
SDPA (``--kernel sdpa``) -> fused attention kernel (``--kernel fused``) -> prompt batching
(``--batch-size`` images per encoder call, all their prompts in one decoder call); then int8,
2:4 sparse and int8+sparse each on top of that. A technique this tree does not have
(``sam_eval`` exit status 3) is recorded as skipped with the reason, and the next one builds
on the last that ran. Writes ``<name>.csv``, ``<name>.json`` (``save_result``),
``<name>.png`` and ``<name>.svg`` (bars: img/s; line: peak memory; labels: mIoU), the CSV
and chart after every technique. ``--resume`` continues an interrupted waterfall of the same
``--name`` (e.g. one cut by a time limit: run the same command again with ``--resume``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.harness import REPO_ROOT, print_table, results_dir, save_result

#: (name, flags changed from the base, cumulative: later techniques build on this one when it ran)
TECHNIQUES: list[tuple[str, dict, bool]] = [
    ("fp32", {"--dtype": "fp32", "--compile": "off", "--batch-size": "1", "--prompt-batch": "1"}, True),
    ("bf16", {"--dtype": "bf16"}, True),
    ("compile", {"--compile": "on"}, True),
    ("sdpa", {"--kernel": "sdpa"}, True),
    ("fused", {"--kernel": "fused"}, True),
    ("prompt_batching", {"--batch-size": None, "--prompt-batch": "0"}, True),  # --batch-size from the CLI
    ("int8", {"--quantize": "int8"}, False),
    ("sparse", {"--quantize": "sparse"}, False),
    ("int8+sparse", {"--quantize": "int8+sparse"}, False),
]
COLUMNS = ("technique", "status", "img_per_s", "peak_memory_gib", "miou_oracle", "miou_top", "miou_single",
           "images", "annotations", "warmup_s", "wall_s", "reason", "flags")


def run_technique(name: str, flags: dict, common: list[str], out_dir: Path, prefix: str, timeout: float) -> dict:
    argv = [sys.executable, "-m", "experiments.sam_eval", *common, "--out-dir", str(out_dir),
            "--name", f"{prefix}_{name.replace('+', '-')}", "--no-progress"]
    for k, v in flags.items():
        argv += [k, v]
    row = {"technique": name}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "failed", "reason": f"timed out after {timeout:.0f} s", "wall_s": timeout}
    row["wall_s"] = time.perf_counter() - t0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if r.returncode == 3:
        reason = next((ln for ln in reversed(lines) if ln.startswith("unavailable:")), "unavailable")
        return {**row, "status": "skipped", "reason": reason.removeprefix("unavailable: ")}
    if r.returncode != 0:
        return {**row, "status": "failed", "reason": " | ".join(lines[-3:]) or f"exit status {r.returncode}"}
    rec = json.loads((out_dir / f"{prefix}_{name.replace('+', '-')}.json").read_text())
    f = rec["figures"]
    return {**row, "status": "ok", **{k: f.get(k) for k in COLUMNS if k in f}}


def draw(rows: list[dict], title: str, paths: list[Path]) -> None:
    """Bars of img/s per technique (skipped ones labelled), peak memory on a second axis, mIoU
    written on the bars. Uses matplotlib's object API (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = list(range(len(rows)))
    ips = [r.get("img_per_s") or 0.0 for r in rows]
    bars = ax.bar(x, ips, color=["tab:blue" if r["status"] == "ok" else "lightgrey" for r in rows])
    top = max(ips) if any(ips) else 1.0
    for xi, r, b in zip(x, rows, bars):
        if r["status"] == "ok":
            miou = r.get("miou_oracle")
            label = f"{r['img_per_s']:.3g} img/s" + (f"\nmIoU {miou:.3f}" if miou is not None else "")
        else:
            label = r["status"]
        ax.text(xi, b.get_height() + 0.02 * top, label, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [r["technique"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("images / s")
    ax.set_ylim(0, top * 1.3)
    mem = [(xi, r["peak_memory_gib"]) for xi, r in zip(x, rows) if r["status"] == "ok" and r.get("peak_memory_gib")]
    if mem:
        ax2 = ax.twinx()
        ax2.plot([m[0] for m in mem], [m[1] for m in mem], "o-", color="tab:red")
        ax2.set_ylabel("peak GPU memory (GiB)", color="tab:red")
        ax2.set_ylim(0, max(m[1] for m in mem) * 1.3)
    ax.set_title(title, fontsize=9)
    for p in paths:
        tmp = p.with_name(f".{p.stem}.tmp{p.suffix}")
        fig.savefig(tmp, dpi=150)
        os.replace(tmp, p)


def _number(v):
    if v in ("", None):
        return None
    try:
        return float(v)
    except ValueError:
        return v


def write_outputs(rows: list[dict], csv_path: Path, title: str) -> None:
    tmp_csv = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp_csv, csv_path)
    draw(rows, title, [csv_path.with_suffix(".png"), csv_path.with_suffix(".svg")])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images")
    p.add_argument("--annotations")
    p.add_argument("--synthetic", type=int, metavar="N", help="generate N images (experiments.coco_synth) instead")
    p.add_argument("--model-type", default="vit_h", choices=("vit_h", "vit_l", "vit_b", "tiny"))
    p.add_argument("--checkpoint")
    p.add_argument("--limit", type=int)
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder call from 'prompt_batching' on")
    p.add_argument("--techniques", help="comma-separated subset of: " + ", ".join(t[0] for t in TECHNIQUES))
    p.add_argument("--device")
    p.add_argument("--extra", default="", help="more sam_eval flags for every run, e.g. '--workers 4 --warmup 2'")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per technique (default 3600)")
    p.add_argument("--out-dir", help="results folder (default experiments/results/<gpu>)")
    p.add_argument("--name", help="default sam_waterfall_<model>[_synthetic]")
    p.add_argument("--resume", action="store_true",
                   help="keep the techniques already in <name>.csv (ok or skipped, same flags) and run the rest")
    a = p.parse_args(argv)
    if (a.synthetic is None) == (a.images is None or a.annotations is None):
        p.error("give --images and --annotations, or --synthetic N")
    known = [t[0] for t in TECHNIQUES]
    chosen = known if not a.techniques else [t.strip() for t in a.techniques.split(",") if t.strip()]
    bad = [t for t in chosen if t not in known]
    if bad:
        p.error(f"unknown technique(s) {bad}; expected some of {known}")
    name = a.name or f"sam_waterfall_{a.model_type}" + ("_synthetic" if a.synthetic else "")
    out_dir = results_dir(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="sam_waterfall.") as tmp:
        if a.synthetic:
            from experiments.coco_synth import make_coco_synth
            from experiments.sam_eval import SYNTH_SIZES

            ann = make_coco_synth(Path(tmp) / "data", a.synthetic, 0, sizes=SYNTH_SIZES)
            images, annotations = ann.parent / "images", ann
        else:
            images, annotations = a.images, a.annotations
        common = ["--images", str(images), "--annotations", str(annotations), "--model-type", a.model_type]
        for flag, val in (("--checkpoint", a.checkpoint), ("--limit", a.limit), ("--device", a.device)):
            if val is not None:
                common += [flag, str(val)]
        common += shlex.split(a.extra)
        data = f"{a.synthetic} synthetic images" if a.synthetic else Path(str(annotations)).name
        weights = Path(a.checkpoint).name if a.checkpoint else "random weights"
        title = f"SAM {a.model_type} ({weights}), {data}"
        csv_path = out_dir / f"{name}.csv"
        done = {}
        if a.resume and csv_path.is_file():
            done = {r["technique"]: r for r in csv.DictReader(open(csv_path)) if r["status"] in ("ok", "skipped")}
        base: dict = {}
        rows = []
        for tech, delta, cumulative in tqdm([t for t in TECHNIQUES if t[0] in chosen], desc="SAM waterfall", unit="run"):
            delta = {k: (str(a.batch_size) if v is None else v) for k, v in delta.items()}
            flags = {**base, **delta}
            words = shlex.split(done[tech].get("flags") or "") if tech in done else []
            if tech in done and dict(zip(words[::2], words[1::2])) == flags:
                row = {k: _number(v) for k, v in done[tech].items()}  # --resume: ran with these flags before
            else:
                row = run_technique(tech, flags, common, out_dir, name, a.timeout)
                row["flags"] = " ".join(f"{k} {shlex.quote(v)}" for k, v in flags.items())
            rows.append(row)
            tqdm.write(f"{tech}: {row['status']} {row.get('img_per_s') or ''} {row.get('reason') or ''}")
            if row["status"] == "ok" and cumulative:
                base = flags
            write_outputs(rows, csv_path, title)  # after every run: a run cut short keeps what it measured
    print_table(rows, ["technique", "status", "img_per_s", "peak_memory_gib", "miou_oracle", "reason"])
    path = save_result(name, {"rows": rows}, a, out_dir=a.out_dir)
    print(f"wrote {path}, {csv_path.name}, {name}.png, {name}.svg")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
