"""Tables, CSVs, charts and a summary from benchmark JSON records alone.

    python -m experiments.report RESULTS_DIR --out DIR   # CSV per model, PNG+SVG charts, summary.md
    python -m experiments.report --update-readme         # README results block from experiments/results/
    python -m experiments.report --check-readme          # exit 1 if that block is stale

RESULTS_DIR is a folder of records written by ``experiments.harness.save_result``: the
committed ``experiments/results/<gpu>/`` or the output folder of ``experiments.reproduce``.
Percentages of ceiling use the folder's ``ceilings`` record (copy bandwidth, bf16 / int8
matmul rates); the Llama decode ceiling is copy bandwidth ÷ weight bytes tokens/s.

Records are read by kind (the benchmark module that wrote them, ``record["module"]``, or
for older records their ``name``).  Benchmarks whose records hold ``figures["rows"]`` (a
list of dicts) are tabulated as they are; SAM charts take the rows' label (``technique``,
``variant``, ``step``, ``mode`` or ``config``) and images/s (``img_s``, ``images_per_s``).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO_ROOT / "experiments" / "results"
README = REPO_ROOT / "README.md"
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"

# kind (benchmark module without "experiments.") -> model group
MODEL_OF_KIND = {
    "ceilings": "device",
    "llama_decode": "llama", "llama_tp": "llama",
    "vit_throughput": "vit",
    "sam_throughput": "sam", "bench_sam_prompts": "sam", "sam_waterfall": "sam", "sam_eval": "sam",
    "bench_amg": "sam",
    "bench_ops": "ops", "bench_weight_only_linear": "ops", "bench_int8_mm": "ops",
    "bench_rel_pos_attention": "ops",
}
# record names of benchmarks whose record name is not their module's (records without "module")
KIND_OF_NAME = {"weight_only_linear": "bench_weight_only_linear", "int8_mm": "bench_int8_mm",
                "rel_pos_attention": "bench_rel_pos_attention"}
MODEL_ORDER = ("device", "llama", "vit", "sam", "ops")
LABEL_KEYS = ("technique", "variant", "step", "mode", "config", "impl")
IMG_S_KEYS = ("img_s", "images_per_s", "img_per_s")
CEILING_COLUMNS = [  # ceilings record key, column title, unit
    ("copy_gbps", "copy bandwidth (read + write)", "GB/s"),
    ("bf16_tflops", "bf16 matmul", "TFLOP/s"),
    ("fp16_tflops", "fp16 matmul", "TFLOP/s"),
    ("int8_tops", "int8 `torch._int_mm`", "TOP/s"),
    ("int8_tops_row_major_b", "int8, row-major B", "TOP/s"),
]
DTYPE_SHORT = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


# ----------------------------------------------------------------------------- records
def load_records(folder: str | os.PathLike) -> list[dict]:
    """The benchmark records (JSON with ``name`` and ``figures``) directly in ``folder``, by file name."""
    records = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if isinstance(rec, dict) and "figures" in rec and "name" in rec:
            rec["_file"] = path.name
            records.append(rec)
    return records


def record_kind(rec: dict) -> str:
    module = rec.get("module")
    if module:
        return module.rsplit(".", 1)[-1]
    name = rec["name"]
    for prefix, kind in KIND_OF_NAME.items():
        if name.startswith(prefix):
            return kind
    for kind in sorted(MODEL_OF_KIND, key=len, reverse=True):
        if name.startswith(kind):
            return kind
    return name


def record_model(rec: dict) -> str:
    return rec.get("model") or MODEL_OF_KIND.get(record_kind(rec), "ops")


def ceilings_of(records: Iterable[dict]) -> dict[str, float]:
    """The figures of the latest ``ceilings`` record ({} if none)."""
    found = [r for r in records if record_kind(r) == "ceilings"]
    if not found:
        return {}
    latest = max(found, key=lambda r: str(r.get("date", "")))
    return {k: v for k, v in latest["figures"].items() if isinstance(v, (int, float))}


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _pct(value: Any, ceiling: Any) -> float | None:
    v, c = _num(value), _num(ceiling)
    return 100 * v / c if v is not None and c else None


# ----------------------------------------------------------------------------- rows per kind
def llama_rows(rec: dict, ceilings: dict) -> list[dict]:
    f = rec["figures"]
    weight_bytes = _num(f.get("weight_bytes")) or (_num(f.get("weight_bytes_gb")) or 0) * 1e9 or None
    copy = _num(ceilings.get("copy_gbps")) or _num(f.get("copy_bandwidth_gbs"))
    ceiling = copy * 1e9 / weight_bytes if copy and weight_bytes else None
    mode = f.get("quantize") or DTYPE_SHORT.get(str(f.get("dtype")), str(f.get("dtype")))
    if not isinstance(f.get("batches"), dict):
        raise KeyError("figures['batches']")
    rows = []
    for batch, e in sorted(f["batches"].items(), key=lambda kv: int(kv[0])):
        tok_s = _num(e.get("decode_tokens_per_s_per_seq"))
        rows.append({
            "preset": f.get("preset"), "mode": mode, "compile": f.get("compile"), "batch": int(batch),
            "tokens_per_s_per_seq": tok_s, "total_tokens_per_s": _num(e.get("total_tokens_per_s")),
            "ceiling_tokens_per_s": ceiling, "pct_of_ceiling": _pct(tok_s, ceiling),
            "bandwidth_gbs": _num(e.get("bandwidth_gbs")),
            "time_to_first_token_ms": _num(e.get("time_to_first_token_ms")),
            "compile_s": _num(e.get("compile_s")),
            "prefill_tokens_per_s": _num(f.get("prefill_tokens_per_s")),
        })
    return rows


def llama_tp_rows(rec: dict, ceilings: dict) -> list[dict]:
    """A tensor-parallel record (``experiments.llama_tp``): one row, per-GPU bandwidth; or the
    all-reduce micro-benchmark's rows (``--allreduce-bench``: one per message size)."""
    f = rec["figures"]
    if "decode_tokens_per_s" not in f and "symm_mem_backend" in f and isinstance(f.get("rows"), list):
        return [{"gpus": f.get("world_size"), **r} for r in f["rows"]]
    if "decode_tokens_per_s" not in f:
        raise KeyError("figures['decode_tokens_per_s']")
    mode = f.get("quantize") or f.get("weights") or DTYPE_SHORT.get(str(f.get("dtype")), str(f.get("dtype")))
    if f.get("allreduce") not in (None, "nccl", "none"):  # e.g. "bf16 symm_mem"; NCCL rows keep their label
        mode = f"{mode} {f['allreduce']}"
    return [{
        "preset": f.get("preset"), "mode": mode, "gpus": f.get("world_size"), "compile": f.get("compile"),
        "batch": f.get("batch"), "tokens_per_s": _num(f.get("decode_tokens_per_s")),
        "bandwidth_gbs_per_gpu": _num(f.get("bandwidth_gbs_per_gpu")),
        "pct_of_copy_bandwidth": _num(f.get("pct_of_copy_bandwidth")),
        "allreduce_us": _num(f.get("allreduce_us")), "time_to_first_token_ms": _num(f.get("time_to_first_token_ms")),
        "compile_s": _num(f.get("compile_s")), "same_tokens_on_every_rank": f.get("same_tokens_on_every_rank"),
    }]


def vit_rows(rec: dict, ceilings: dict) -> list[dict]:
    return [dict(r) for r in rec["figures"].get("rows", [])]


def ceilings_rows(rec: dict, ceilings: dict) -> list[dict]:
    return [{"ceiling": k, "value": v} for k, v in rec["figures"].items() if _num(v) is not None]


def generic_rows(rec: dict, ceilings: dict) -> list[dict]:
    f = rec["figures"]
    rows = f.get("rows") if isinstance(f, dict) else None
    if isinstance(rows, list) and all(isinstance(r, dict) for r in rows):
        return [dict(r) for r in rows]
    return [{k: v for k, v in f.items() if not isinstance(v, (dict, list))}] if isinstance(f, dict) else []


ROWS_OF_KIND = {"llama_decode": llama_rows, "llama_tp": llama_tp_rows, "vit_throughput": vit_rows,
                "ceilings": ceilings_rows}


def rows_of(rec: dict, ceilings: dict) -> list[dict]:
    """Table rows of one record: by its kind's reader, or as generic rows when it has another layout."""
    reader = ROWS_OF_KIND.get(record_kind(rec), generic_rows)
    try:
        return reader(rec, ceilings)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        print(f"warning: {rec.get('_file', rec.get('name'))}: not in the layout {reader.__name__} reads "
              f"({type(e).__name__}: {e}); tabulated as generic rows", file=sys.stderr)
        return generic_rows(rec, ceilings)


def _label_key(rows: Sequence[dict]) -> str | None:
    return next((k for k in LABEL_KEYS if rows and all(k in r for r in rows)), None)


def _img_s_key(rows: Sequence[dict]) -> str | None:
    return next((k for k in IMG_S_KEYS if rows and all(_num(r.get(k)) is not None for r in rows)), None)


def pct_of_ceiling(rec: dict, ceilings: dict) -> list[dict]:
    """The record's headline figures as a percentage of the device's ceilings."""
    kind = record_kind(rec)
    rows = rows_of(rec, ceilings)
    out = []
    if kind == "llama_decode":
        for r in rows:
            if r.get("pct_of_ceiling") is not None:
                out.append({"what": f"{r['preset']} {r['mode']} batch {r['batch']} decode",
                            "value": r["tokens_per_s_per_seq"], "unit": "tokens/s per sequence",
                            "ceiling": r["ceiling_tokens_per_s"], "ceiling_of": "copy bandwidth / weight bytes",
                            "pct": r["pct_of_ceiling"]})
        return out
    # rows that carry their own percentages (ViT: pct_bf16_ceiling, kernels: %copy, ...)
    label = _label_key(rows)
    for r in rows:
        for k, v in r.items():
            if _num(v) is not None and ("pct" in k.lower() or "%" in k):
                what = " ".join(str(r[x]) for x in ("model", "op", "shape", "M", "kind") if x in r)
                out.append({"what": " ".join(filter(None, [what, str(r.get(label, "")) if label else ""])),
                            "key": k, "pct": v})
    return out


# ----------------------------------------------------------------------------- formatting
def fmt(v: Any) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if v != v:
            return "–"
        a = abs(v)
        return f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.01 else f"{v:.2g}"
    return str(v).replace("|", "\\|")


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _scalar_columns(rows: Sequence[dict], limit: int = 12) -> list[str]:
    cols: OrderedDict[str, None] = OrderedDict()
    for r in rows:
        for k, v in r.items():
            if not isinstance(v, (dict, list)):
                cols[k] = None
    return list(cols)[:limit]


def _env_line(records: Sequence[dict], gpu: bool = True) -> str:
    def distinct(key: str) -> str:
        vals = sorted({str(r[key]) for r in records if r.get(key)})
        return " / ".join(vals) if vals else "?"

    dates = sorted(str(r["date"])[:10] for r in records if r.get("date"))
    when = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else "?"
    commits = sorted({str(r["commit"])[:7] for r in records if r.get("commit")})
    return ((f"{distinct('gpu')}; " if gpu else "") + f"torch {distinct('torch')}, CUDA {distinct('cuda')}, "
            f"triton {distinct('triton')}, Python {distinct('python')}; measured {when} "
            f"(commit{'s' if len(commits) > 1 else ''} {', '.join(commits) or '?'}).")


def _summary_text(rec: dict) -> str | None:
    """A record's one-paragraph summary (``figures["summary"]`` as text, or its ``"text"``)."""
    summary = rec.get("figures", {}).get("summary") if isinstance(rec.get("figures"), dict) else None
    if isinstance(summary, dict):
        summary = summary.get("text")
    return summary if isinstance(summary, str) and summary.strip() else None


def sections(records: Sequence[dict], max_rows: int | None = None) -> list[tuple[str, str]]:
    """(title, markdown) per group of results: ceilings, Llama, ViT, SAM, kernels. ``max_rows``:
    a record tabulated row by row (a layout no table of its kind knows) shows its summary and at
    most that many rows, then where the rest is."""
    ceilings = ceilings_of(records)
    by_kind: OrderedDict[str, list[dict]] = OrderedDict()
    for rec in sorted(records, key=lambda r: (MODEL_ORDER.index(record_model(r))
                                              if record_model(r) in MODEL_ORDER else 99, r["_file"])):
        by_kind.setdefault(record_kind(rec), []).append(rec)
    out = []
    if ceilings:
        shown = [(label, unit, ceilings[key]) for key, label, unit in CEILING_COLUMNS if key in ceilings]
        out.append(("Device ceilings", md_table([label for label, _, _ in shown],
                                                [[f"{fmt(v)} {unit}" for _, unit, v in shown]])))
    for kind, recs in by_kind.items():
        if kind == "ceilings":
            continue
        layout = LAYOUTS.get(kind)
        fits = [r for r in recs if layout and _fits(rows_of(r, ceilings), layout[0])]
        if fits:
            out.append(layout[1](kind, fits, ceilings))
        for r in recs:  # records of a layout the kind's table does not know: their rows as they are
            if r in fits:
                continue
            rows = rows_of(r, ceilings)
            cols = _scalar_columns(rows)
            if rows and cols:
                shown = rows if max_rows is None else rows[:max_rows]
                text = md_table(cols, [[x.get(c) for c in cols] for x in shown])
                if len(shown) < len(rows):
                    summary = _summary_text(r)
                    text = ((summary + "\n\n") if summary else "") + text + (
                        f"\n\n… and {len(rows) - len(shown)} more rows in `{r['_file']}`.")
                out.append((f"{kind} (`{r['_file']}`)", text))
    return out


def _fits(rows: Sequence[dict], keys: Sequence[str]) -> bool:
    return bool(rows) and all(k in x for x in rows for k in keys)


def _llama_table(kind: str, recs: Sequence[dict], ceilings: dict) -> tuple[str, str]:
    rows = sorted(((r, x) for r in recs for x in rows_of(r, ceilings)),
                  key=lambda rx: (str(rx[1]["preset"]), str(rx[1]["mode"]), rx[1]["batch"], rx[0]["_file"]))
    return ("Llama decode — tokens/s; ceiling = copy bandwidth ÷ weight bytes", md_table(
        ["model", "mode", "batch", "fastzoo tokens/s per sequence", "total tokens/s",
         "ceiling tokens/s", "% of ceiling", "time to first token, ms", "compile, s",
         "prefill tokens/s", "record"],
        [[x["preset"], x["mode"], x["batch"], x["tokens_per_s_per_seq"], x["total_tokens_per_s"],
          x["ceiling_tokens_per_s"], x["pct_of_ceiling"], x["time_to_first_token_ms"],
          x["compile_s"], x["prefill_tokens_per_s"], f"`{r['_file']}`"] for r, x in rows]))


def _vit_table(kind: str, recs: Sequence[dict], ceilings: dict) -> tuple[str, str]:
    return ("ViT — images/s, timm (baseline) and fastzoo", _pivot_table(
        recs, ceilings, index=("model", "batch"), column="mode", value="img_s",
        extra=("x_vs_fz_bf16", "best fastzoo speedup vs fastzoo bf16", max)))


def _linear_table(kind: str, recs: Sequence[dict], ceilings: dict) -> tuple[str, str]:
    return ("Decode linears (M rows) — µs (% of copy bandwidth), baselines and fastzoo",
            _pivot_table(recs, ceilings, index=("shape", "M", "kind"), column="impl", value="us", pct="%copy"))


def _ops_table(kind: str, recs: Sequence[dict], ceilings: dict) -> tuple[str, str]:
    rows = [(r, x) for r in recs for x in rows_of(r, ceilings)]
    return ("Kernels vs their references — µs", md_table(
        ["op", "shape", "dtype", "fastzoo kernel", "compiled reference", "eager reference",
         "kernel % of copy", "record"],
        [[x.get("op"), x.get("shape"), x.get("dtype"), x.get("kernel_us"), x.get("compiled_ref_us"),
          x.get("eager_ref_us"), x.get("kernel_pct_of_copy"), f"`{r['_file']}`"] for r, x in rows]))


# kind -> (keys every row must have, table maker); other kinds and layouts get generic tables
LAYOUTS = {
    "llama_decode": (("preset", "mode", "batch", "tokens_per_s_per_seq"), _llama_table),
    "vit_throughput": (("model", "mode", "img_s"), _vit_table),
    "bench_weight_only_linear": (("shape", "M", "kind", "impl", "us"), _linear_table),
    "bench_ops": (("op", "kernel_us"), _ops_table),
}


def _pivot_table(recs, ceilings, *, index, column, value, pct=None, extra=None) -> str:
    rows = [(r, x) for r in recs for x in rows_of(r, ceilings)]
    cols: OrderedDict[str, None] = OrderedDict((x.get(column), None) for _, x in rows)
    table: OrderedDict[tuple, dict] = OrderedDict()
    for r, x in rows:
        key = tuple(x.get(k) for k in index)
        cell = fmt(_num(x.get(value)))
        if pct and _num(x.get(pct)) is not None:
            cell += f" ({fmt(_num(x[pct]))} %)"
        entry = table.setdefault(key, {"cells": {}, "extra": [], "files": set()})
        entry["cells"][x.get(column)] = cell
        entry["files"].add(r["_file"])
        if extra and _num(x.get(extra[0])) is not None and str(x.get(column, "")).startswith("fz-"):
            entry["extra"].append(x[extra[0]])
    header = [*index, *map(str, cols)] + ([extra[1]] if extra else []) + ["record"]
    body = []
    for key, e in table.items():
        row = [*key, *(e["cells"].get(c, "–") for c in cols)]
        if extra:
            row.append(f"{fmt(extra[2](e['extra']))}×" if e["extra"] else "–")
        row.append(", ".join(f"`{f}`" for f in sorted(e["files"])))
        body.append(row)
    return md_table(header, body)


def markdown(records: Sequence[dict], level: int = 3, gpu: bool = True, max_rows: int | None = None) -> str:
    """Markdown of every section: an environment line (naming the GPU if ``gpu``), then a titled table per group."""
    if not records:
        return "No records.\n"
    parts = [_env_line(records, gpu)]
    for title, table in sections(records, max_rows):
        parts.append(f"{'#' * level} {title}\n\n{table}")
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- files
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, newline="") as f:
        f.write(text)
    os.replace(f.name, path)


def write_csvs(records: Sequence[dict], out: Path) -> list[Path]:
    """One CSV per model group (``llama.csv`` ...): a line per table row, with its record's metadata."""
    ceilings = ceilings_of(records)
    groups: OrderedDict[str, list[dict]] = OrderedDict()
    for rec in records:
        for row in rows_of(rec, ceilings):
            meta = {"record": rec["_file"], "bench": record_kind(rec), "gpu": rec.get("gpu"),
                    "date": rec.get("date"), "commit": rec.get("commit")}
            groups.setdefault(record_model(rec), []).append(
                {**meta, **{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()}})
    paths = []
    for model, rows in groups.items():
        cols = list(OrderedDict((k, None) for r in rows for k in r))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        path = out / f"{model}.csv"
        _atomic_write(path, buf.getvalue())
        paths.append(path)
    return paths


def _save_fig(fig, out: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "svg"):
        path = out / f"{stem}.{ext}"
        tmp = out / f".{stem}.tmp.{ext}"
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def write_charts(records: Sequence[dict], out: Path) -> list[Path]:
    """PNG + SVG charts: Llama tokens/s per mode vs the ceiling, ViT images/s per mode, SAM per technique."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    ceilings = ceilings_of(records)
    paths: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)

    llama = [x for r in records if record_kind(r) == "llama_decode"
             for x in rows_of(r, ceilings) if "tokens_per_s_per_seq" in x]
    if llama:
        best: OrderedDict[tuple, dict] = OrderedDict()
        for x in sorted(llama, key=lambda x: (str(x["preset"]), str(x["mode"]), x["batch"])):
            best.setdefault((x["preset"], x["mode"]), x)  # the smallest batch per preset and mode
        fig = Figure(figsize=(max(4, 1.3 * len(best) + 2), 4))
        ax = fig.add_subplot()
        labels = [f"{p}\n{m}\nbatch {x['batch']}" for (p, m), x in best.items()]
        xs = range(len(best))
        ceil = [x["ceiling_tokens_per_s"] or 0 for x in best.values()]
        ax.bar(xs, ceil, width=0.7, color="none", edgecolor="0.4", linestyle="--",
               label="ceiling: copy bandwidth ÷ weight bytes")
        vals = [x["tokens_per_s_per_seq"] or 0 for x in best.values()]
        bars = ax.bar(xs, vals, width=0.5, color="tab:blue", label="fastzoo decode")
        for b, x in zip(bars, best.values()):
            if x["pct_of_ceiling"] is not None:
                ax.annotate(f"{x['pct_of_ceiling']:.0f} %", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylim(0, 1.3 * max(ceil + vals + [1]))
        ax.set_ylabel("tokens/s per sequence")
        ax.set_title("Llama decode vs the bandwidth ceiling")
        ax.legend(fontsize=8, loc="upper left")
        paths += _save_fig(fig, out, "llama_decode")

    vit = [x for r in records if record_kind(r) == "vit_throughput" for x in rows_of(r, ceilings)
           if _num(x.get("img_s")) is not None]
    if vit:
        models = list(OrderedDict((x.get("model"), None) for x in vit))
        label = _label_key(vit)  # the mode (timm-fp32, fz-bf16-compile, ...)
        variants = list(OrderedDict((x.get(label), None) for x in vit))
        fig = Figure(figsize=(max(5, 1.2 * len(models) * len(variants) / 2 + 2), 4))
        ax = fig.add_subplot()
        w = 0.8 / len(variants)
        for j, v in enumerate(variants):
            ys = [next((x["img_s"] for x in vit if x.get("model") == m and x.get(label) == v), 0)
                  for m in models]
            ax.bar([i + j * w for i in range(len(models))], ys, width=w, label=str(v))
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(models))], [str(m) for m in models], fontsize=8)
        ax.set_ylabel("images/s")
        ax.set_title("ViT throughput per mode")
        ax.legend(fontsize=7)
        paths += _save_fig(fig, out, "vit_throughput")

    sam = []
    for r in records:
        if record_model(r) != "sam":
            continue
        rows = rows_of(r, ceilings)
        label, val = _label_key(rows), _img_s_key(rows)
        if label and val:
            sam.append((r, [(str(x[label]), float(x[val])) for x in rows]))
    if sam:
        fig = Figure(figsize=(7, 1.2 + sum(0.35 * len(rows) + 0.6 for _, rows in sam)))
        axes = fig.subplots(len(sam), 1, squeeze=False)[:, 0]
        for ax, (r, rows) in zip(axes, sam):
            names = [n for n, _ in rows][::-1]
            vals = [v for _, v in rows][::-1]
            bars = ax.barh(range(len(rows)), vals, color="tab:green")
            base = rows[0][1] or float("nan")
            for b, v in zip(bars, vals):
                ax.annotate(f" {v:,.1f} ({v / base:.2f}×)", (b.get_width(), b.get_y() + b.get_height() / 2),
                            va="center", fontsize=7)
            ax.set_yticks(range(len(rows)), names, fontsize=7)
            ax.set_title(f"SAM — {r.get('config') or r['name']}", fontsize=9)
            ax.set_xlabel("images/s")
            ax.set_xlim(0, max(vals) * 1.3)
        fig.tight_layout()
        paths += _save_fig(fig, out, "sam")
    return paths


def write_report(results_dir: str | os.PathLike, out: str | os.PathLike, charts: bool = True) -> dict[str, Any]:
    """CSV per model, charts and ``summary.md`` in ``out`` from the records in ``results_dir``."""
    results_dir, out = Path(results_dir), Path(out)
    records = load_records(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    csvs = write_csvs(records, out)
    chart_paths: list[Path] = []
    chart_note = ""
    if charts:
        try:
            chart_paths = write_charts(records, out)
        except ImportError as e:
            chart_note = f"charts not drawn: {e} (pip install matplotlib)"
            print(f"warning: {chart_note}", file=sys.stderr)
    parts = [f"# Results: `{results_dir}`\n", markdown(records, level=2)]
    if chart_paths:
        parts.append("## Charts\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in chart_paths if p.suffix == ".png"))
    if chart_note:
        parts.append(chart_note)
    for book in ("failures", "skipped"):
        path = results_dir / f"{book}.json"
        entries = json.loads(path.read_text()) if path.exists() else {}
        if entries:
            parts.append(f"## {book.capitalize()}\n\n" + md_table(
                ["configuration", "reason", "command"],
                [[n, e.get("reason"), f"`{e.get('command')}`"] for n, e in entries.items()]))
    summary = out / "summary.md"
    _atomic_write(summary, "\n\n".join(p.rstrip() for p in parts) + "\n")
    return {"records": len(records), "csv": csvs, "charts": chart_paths, "summary": summary}


# ----------------------------------------------------------------------------- README
README_MAX_ROWS = 24  # rows of a record tabulated as it is, in the README (summary.md has them all)


def readme_block(results_root: str | os.PathLike = RESULTS_ROOT) -> str:
    """The generated README results block (markers included) for every ``<results_root>/<gpu>/``."""
    root = Path(results_root)
    parts = [BEGIN, "<!-- generated by `python -m experiments.report --update-readme` from "
                    "experiments/results/; edit the records or the generator, not this block -->"]
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        records = load_records(folder)
        if not records:
            continue
        gpus = sorted({str(r.get("gpu")) for r in records if r.get("gpu")})
        parts.append(f"### {', '.join(gpus) or folder.name} (`experiments/results/{folder.name}/`)\n\n"
                     + markdown(records, level=4, gpu=False, max_rows=README_MAX_ROWS).rstrip())
    parts.append(END)
    return "\n\n".join(parts)


def replace_block(text: str, block: str) -> str:
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README must hold exactly one {BEGIN} … {END} pair, in that order")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return head + block + tail


def readme_current_block(text: str) -> str:
    return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("results_dir", nargs="?", type=Path, help="folder of JSON records")
    p.add_argument("--out", type=Path, help="output folder (default: RESULTS_DIR)")
    p.add_argument("--no-charts", action="store_true")
    p.add_argument("--update-readme", action="store_true", help="regenerate README.md's results block")
    p.add_argument("--check-readme", action="store_true", help="exit 1 if README.md's results block is stale")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--results-root", type=Path, default=RESULTS_ROOT)
    args = p.parse_args(argv)
    if not (args.results_dir or args.update_readme or args.check_readme):
        p.error("give RESULTS_DIR, --update-readme or --check-readme")
    if args.update_readme or args.check_readme:
        text = args.readme.read_text()
        try:
            new = replace_block(text, readme_block(args.results_root))
        except ValueError as e:
            print(f"error: {args.readme}: {e}", file=sys.stderr)
            return 2
        if args.check_readme and new != text:
            print(f"{args.readme}: the results block is stale; run python -m experiments.report --update-readme",
                  file=sys.stderr)
            return 1
        if args.update_readme and new != text:
            _atomic_write(args.readme, new)
            print(f"updated {args.readme}", file=sys.stderr)
    if args.results_dir:
        if not args.results_dir.is_dir():
            print(f"error: {args.results_dir} is not a folder of JSON records", file=sys.stderr)
            return 2
        res = write_report(args.results_dir, args.out or args.results_dir, charts=not args.no_charts)
        print(f"{res['records']} records -> {res['summary']}, {len(res['csv'])} CSV, "
              f"{len(res['charts'])} chart files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
