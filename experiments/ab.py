"""Same-machine A/B runs of one benchmark command: the working tree against some of its files
as they are at another revision, alternating, in one GPU call.

    # here (with the git history): the files to compare, as they are at the base revision
    python -m experiments.ab prepare --rev HEAD~1 fastzoo/ops/int8_mm.py
    # on the GPU machine (its copy of the tree needs no git history)
    python -m experiments.ab run --repeat 3 --out $OUT \\
        --metric figures.batches.1.decode_tokens_per_s_per_seq \\
        -- python -m experiments.llama_decode --preset llama-2-7b --quick --quantize int8

``prepare`` writes the base versions under ``ab_base/`` (``--base-dir`` names another folder, so
that two A/Bs can travel in one call; ``ab_base*/`` is ignored by git; a file absent at that
revision is listed as absent) and ``ab_base/ab.json`` (the base revision and HEAD, so the summary names
both commits). ``run`` alternates base and new runs (base first unless ``--first new``), each
a fresh process: for a base run it swaps the base files in and puts the working tree's back
afterwards, also when the command fails or is interrupted. Each run's output goes to a log,
the JSON records it wrote under ``experiments/results/`` are collected, and ``OUT`` receives
``ab_summary.json`` (commands, commits, every run's exit status, time and metric values, the
median of each side and new / base) and ``ab_runs.tar.gz`` (the logs and records). Processes
differ from each other on a shared host (autotuning, clocks): compare medians of several
alternating runs, never one pair.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_DIR = "ab_base"
MANIFEST = "ab.json"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def _check_base_dir(base_dir: str) -> None:
    # prepare replaces the folder: only a name that git ignores, never a path into the tree
    if not re.fullmatch(r"ab_base[A-Za-z0-9_.-]*", base_dir):
        raise SystemExit(f"error: the base folder must be a name starting with {BASE_DIR!r} (ignored "
                         f"by git, replaced by prepare), got {base_dir!r}")


def prepare(rev: str, paths: list[str], root: Path = REPO_ROOT, base_dir: str = BASE_DIR) -> Path:
    """Write ``paths`` as they are at ``rev`` under ``root/base_dir`` (replacing what was there)."""
    _check_base_dir(base_dir)
    resolved = _git(root, "rev-parse", "--short", rev)
    if resolved.returncode != 0:
        raise SystemExit(f"error: git cannot resolve revision {rev!r}: {resolved.stderr.strip()}")
    head = _git(root, "rev-parse", "--short", "HEAD").stdout.strip()
    dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no").stdout.strip())
    out = root / base_dir
    if out.exists():
        shutil.rmtree(out)
    files, absent = [], []
    for p in paths:
        rel = Path(p).as_posix()
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise SystemExit(f"error: give paths relative to the repository root, got {p!r}")
        shown = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=root, capture_output=True)
        if shown.returncode != 0:
            absent.append(rel)
            continue
        dest = out / "files" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(shown.stdout)
        files.append(rel)
    manifest = {"base_rev": rev, "base_commit": resolved.stdout.strip(),
                "new_commit": head + ("-dirty" if dirty else ""), "files": files, "absent_at_base": absent}
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _records(root: Path) -> dict[str, float]:
    folder = root / "experiments" / "results"
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in folder.rglob("*.json")} if folder.exists() else {}


def _dig(record: Any, path: str) -> Any:
    for key in path.split("."):
        if isinstance(record, dict) and key in record:
            record = record[key]
        elif isinstance(record, list) and key.isdigit() and int(key) < len(record):
            record = record[int(key)]
        else:
            return None
    return record


class _BaseFiles:
    """Context: the base versions of the manifest's files in the working tree (the files
    absent at the base revision moved out), the working tree's versions back on exit."""

    def __init__(self, root: Path, base: Path, manifest: dict) -> None:
        self.root, self.base, self.manifest = root, base, manifest
        self.saved = Path(tempfile.mkdtemp(prefix="ab_saved_"))

    def __enter__(self) -> "_BaseFiles":
        for rel in self.manifest["files"] + self.manifest["absent_at_base"]:
            here = self.root / rel
            if here.exists():
                keep = self.saved / rel
                keep.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(here, keep)
        for rel in self.manifest["absent_at_base"]:
            (self.root / rel).unlink(missing_ok=True)
        for rel in self.manifest["files"]:
            dest = self.root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.base / "files" / rel, dest)
        return self

    def __exit__(self, *exc) -> None:
        for rel in self.manifest["files"] + self.manifest["absent_at_base"]:
            keep, here = self.saved / rel, self.root / rel
            if keep.exists():
                shutil.copy2(keep, here)
            else:  # the working tree has no such file
                here.unlink(missing_ok=True)
        shutil.rmtree(self.saved, ignore_errors=True)


def run(command: list[str], out: Path, repeat: int = 3, metric: str | None = None, first: str = "base",
        root: Path = REPO_ROOT, base_dir: str = BASE_DIR, timeout: float | None = None) -> dict:
    """Alternate ``repeat`` base and ``repeat`` new runs of ``command``; returns the summary
    (also written to ``out/ab_summary.json``)."""
    _check_base_dir(base_dir)
    base = root / base_dir
    if not (base / MANIFEST).exists():
        raise SystemExit(f"error: {base / MANIFEST} not found: run `python -m experiments.ab prepare "
                         f"--rev REV PATH...` first (where the git history is)")
    manifest = json.loads((base / MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ab_runs_"))
    order = ["base", "new"] if first == "base" else ["new", "base"]
    runs = []
    for i in range(repeat):
        for label in order:
            tag = f"{label}_{i + 1}"
            before = _records(root)
            start = time.perf_counter()
            log = work / f"{tag}.log"
            files = _BaseFiles(root, base, manifest) if label == "base" else contextlib.nullcontext()
            with open(log, "w") as f, files:
                try:
                    rc = subprocess.run(command, cwd=root, stdout=f, stderr=subprocess.STDOUT,
                                        timeout=timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = 124
            wall = time.perf_counter() - start
            new_records = [r for r, t in _records(root).items() if before.get(r) != t]
            values = []
            for r in sorted(new_records):
                dest = work / tag / r
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / r, dest)
                if metric:
                    try:
                        v = _dig(json.loads((root / r).read_text()), metric)
                    except (OSError, json.JSONDecodeError):
                        v = None
                    if isinstance(v, (int, float)):
                        values.append(v)
            runs.append({"label": label, "index": i + 1, "rc": rc, "wall_s": round(wall, 1),
                         "records": sorted(new_records), "metric": values})
            shown = f" {metric} = {values}" if metric else ""
            print(f"{tag}: exit {rc}, {wall:.0f} s, {len(new_records)} record(s){shown}", flush=True)
    summary = {"command": command, "repeat": repeat, "first": first, "metric": metric, "base_dir": base_dir,
               "timeout": timeout, **manifest, "runs": runs}
    if metric:
        med = {}
        for label in ("base", "new"):
            vals = [v for r in runs if r["label"] == label and r["rc"] == 0 for v in r["metric"]]
            med[label] = statistics.median(vals) if vals else None
        summary["median"] = med
        if med["base"] and med["new"] is not None:
            summary["new_over_base"] = med["new"] / med["base"]
        print(f"median {metric}: base {med['base']}, new {med['new']}"
              + (f", new / base {summary['new_over_base']:.4f}" if "new_over_base" in summary else ""))
    (out / "ab_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with tarfile.open(out / "ab_runs.tar.gz", "w:gz") as tar:
        tar.add(work, arcname="ab_runs")
    shutil.rmtree(work, ignore_errors=True)
    return summary


ENV_KEYS = ("gpu", "torch", "cuda", "triton", "fastzoo", "python", "sm_count", "capability", "memory_gib")


def run_command(summary: dict) -> str:
    """The ``ab run`` command line that gave ``summary`` (shell-quoted)."""
    args = ["python", "-m", "experiments.ab", "run", "--repeat", str(summary["repeat"])]
    if summary.get("metric"):
        args += ["--metric", summary["metric"]]
    if summary.get("first", "base") != "base":
        args += ["--first", summary["first"]]
    if summary.get("timeout"):
        args += ["--timeout", f"{summary['timeout']:g}"]
    if summary.get("base_dir", BASE_DIR) != BASE_DIR:
        args += ["--base-dir", summary["base_dir"]]
    return shlex.join(args + ["--out", "OUT", "--", *summary["command"]])


def record(folder: Path, name: str, note: str, root: Path = REPO_ROOT, force: bool = False) -> Path:
    """A results record from an A/B that came back (``folder`` holds ab_summary.json and
    ab_runs.tar.gz): the machine fields of the runs' records, every run's metric and the
    medians, under ``experiments/results/<gpu>/<name>.json`` (an existing record there is
    kept unless ``force``). Its ``commit`` is the new side's commit as prepare saw it;
    ``note`` says what the two sides were."""
    summary_path, runs_path = folder / "ab_summary.json", folder / "ab_runs.tar.gz"
    for path in (summary_path, runs_path):
        if not path.exists():
            raise SystemExit(f"error: {path} not found: give the folder that `ab run --out` wrote")
    summary = json.loads(summary_path.read_text())
    env = None
    with tarfile.open(runs_path) as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.endswith(".json"):
                candidate = json.load(tar.extractfile(m))
                if isinstance(candidate, dict) and "gpu" in candidate:
                    env = candidate
                    break
    if env is None:
        raise SystemExit(f"error: no run of {folder} wrote a record with the machine's fields (gpu, torch, ...)")
    from experiments import harness

    folder_out = root / "experiments" / "results" / harness.gpu_slug(env["gpu"])
    if (folder_out / f"{name}.json").exists() and not force:
        raise SystemExit(f"error: {folder_out / (name + '.json')} exists: choose another --name, or --force "
                         f"to replace it")

    figures = {k: summary.get(k) for k in ("metric", "median", "new_over_base", "repeat", "first")}
    figures["runs"] = [{k: r[k] for k in ("label", "index", "rc", "wall_s", "metric")} for r in summary["runs"]]
    figures["base"] = {"rev": summary["base_rev"], "commit": summary["base_commit"], "files": summary["files"],
                       "absent_at_base": summary["absent_at_base"]}
    rec = {"name": name, **{k: env.get(k) for k in ENV_KEYS}, "commit": summary["new_commit"], "commit_note": note,
           "command": run_command(summary), "module": "experiments.ab", "date": env.get("date"), "figures": figures}
    return harness.write_record(rec, folder_out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.ab", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="write the base versions of PATHS (needs the git history)")
    pp.add_argument("--rev", required=True, help="the base revision, e.g. HEAD~1")
    pp.add_argument("--base-dir", default=BASE_DIR,
                    help=f"folder for the base files, under the repository root (default {BASE_DIR}/; "
                         f"another name lets two A/Bs travel in one GPU call)")
    pp.add_argument("paths", nargs="+")
    pr = sub.add_parser("run", help="alternate base and new runs of a command")
    pr.add_argument("--repeat", type=int, default=3, help="runs of each side (default 3)")
    pr.add_argument("--out", required=True, help="folder for ab_summary.json and ab_runs.tar.gz")
    pr.add_argument("--metric", help="dotted path of a number in the records, e.g. figures.x.y")
    pr.add_argument("--first", choices=("base", "new"), default="base")
    pr.add_argument("--timeout", type=float, help="seconds per run (exit status 124 past it)")
    pr.add_argument("--base-dir", default=BASE_DIR, help=f"the folder prepare wrote (default {BASE_DIR}/)")
    pr.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    pc = sub.add_parser("record", help="write a results record from a returned A/B folder")
    pc.add_argument("folder", help="the folder `run --out` wrote (ab_summary.json, ab_runs.tar.gz)")
    pc.add_argument("--name", required=True, help="record name: experiments/results/<gpu>/NAME.json")
    pc.add_argument("--note", required=True, help="what the base and new sides were")
    pc.add_argument("--force", action="store_true", help="replace an existing record of that name")
    args = p.parse_args(argv)
    if args.cmd == "record":
        print("wrote", record(Path(args.folder), args.name, args.note, force=args.force))
        return 0
    if args.cmd == "prepare":
        out = prepare(args.rev, args.paths, base_dir=args.base_dir)
        print(f"wrote {out}: {json.loads((out / MANIFEST).read_text())}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("run needs a command after --")
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    summary = run(command, Path(args.out), args.repeat, args.metric, args.first, base_dir=args.base_dir,
                  timeout=args.timeout)
    return 0 if all(r["rc"] == 0 for r in summary["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
