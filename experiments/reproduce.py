"""Reproduce every throughput figure on this machine's GPU, in one command.

    python -m experiments.reproduce --out DIR [--models sam,llama,vit,ops] [--quick]
        [--budget-minutes N] [--only NAME ...] [--force] [--list]

First the device's ceilings (``experiments.ceilings``: copy bandwidth, bf16 and int8
matmul rates), then every benchmark configuration of ``CONFIGS`` below, each in a fresh
process (``python -m experiments.run_config --results-dir ... MODULE ARGS``), with a
progress bar.  Into DIR go:

* ``<config>.json``: the benchmark's record (GPU, versions, commit, command, figures) with
  the configuration, the ceilings and the figures as % of ceiling (``pct_of_ceiling``);
* ``logs/<config>.log``: the benchmark's output;
* ``failures.json``: per failed configuration its return code, command and log tail;
  ``skipped.json``: configurations not run (module not in this tree, too few GPUs, budget);
* CSVs, charts and ``summary.md`` from ``experiments.report``.

Resumable: a configuration whose ``<config>.json`` is in DIR is not run again (``--force``
runs it anyway).  A failure is recorded and the run goes on.  With ``--budget-minutes``
no configuration starts once the budget is spent, and each one's timeout is cut to what
is left.  ``--quick`` runs the small set (one configuration per model, short runs; under
10 minutes on an H100, with a 9-minute budget unless one is given); the full set is the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from experiments import harness

MODELS = ("sam", "llama", "vit", "ops")
QUICK_BUDGET_MINUTES = 9.0  # --quick fits one 10-minute call of a lent GPU


@dataclass(frozen=True)
class Config:
    """One benchmark run: ``python -m <module> <args>`` giving one JSON record.

    ``quick``: in the ``--quick`` set; ``full``: in the full set; ``nproc > 1`` launches
    through ``torchrun --standalone --nproc-per-node <nproc>`` and needs that many GPUs.
    """
    name: str
    model: str
    module: str
    args: tuple[str, ...] = ()
    quick: bool = False
    full: bool = True
    timeout_s: float = 1800
    nproc: int = 1
    record: str | None = None  # a module that writes several records: the name of the one to keep

    def command(self) -> list[str]:
        """The command a user types to run this configuration by hand."""
        if self.nproc > 1:
            return ["torchrun", "--standalone", f"--nproc-per-node={self.nproc}", "-m", self.module, *self.args]
        return ["python", "-m", self.module, *self.args]


def _cfgs(model: str, module: str, entries: Iterable[tuple], **common: Any) -> list[Config]:
    """Configurations of one module from ``(name, "args"[, {field overrides}])`` entries."""
    out = []
    for name, args, *overrides in entries:
        fields = {**common, **(overrides[0] if overrides else {})}
        out.append(Config(name, model, module, tuple(shlex.split(args)), **fields))
    return out


QUICK = {"quick": True, "full": False, "timeout_s": 360}
LLAMA_7B = "--preset llama-2-7b --batch-sizes 1,8 --prompt-len 5 --new-tokens 200 --runs 3"

# The table: (name, arguments[, overrides]) per benchmark module.  Names are the record
# file names in DIR, so keep them stable; add a line to add a configuration.
CEILINGS = Config("ceilings", "device", "experiments.ceilings", quick=True, timeout_s=300)
CONFIGS: list[Config] = [
    CEILINGS,
    # --- SAM
    *_cfgs("sam", "experiments.sam_throughput", [
        ("sam_throughput_vit_b_quick", "--quick", QUICK),
        ("sam_throughput_vit_b", "--model vit_b --batch-sizes 1,8,16,32 --configs all --profile"),
        ("sam_throughput_vit_l", "--model vit_l --batch-sizes 1,8,16,32"),
        ("sam_throughput_vit_h", "--model vit_h --batch-sizes 1,8,16,32 --configs sa-eager,fz-eager,fz-compile,fz-int8"),
    ]),
    *_cfgs("sam", "experiments.bench_sam_prompts", [("sam_prompts_vit_b", "")]),
    *_cfgs("sam", "experiments.bench_amg", [
        ("sam_amg_vit_b_quick", "--quick", QUICK),
        ("sam_amg_vit_b", ""),
    ]),
    *_cfgs("sam", "experiments.sam_waterfall", [
        ("sam_waterfall_vit_b_synthetic", "--synthetic 32 --model-type vit_b --batch-size 8 --timeout 600",
         {"record": "sam_waterfall_vit_b_synthetic"}),
    ], timeout_s=3600),
    # --- Llama (random weights of the preset's shapes; compile time dominates)
    *_cfgs("llama", "experiments.llama_decode", [
        ("llama_2_7b_bf16_quick", "--preset llama-2-7b --quick", QUICK),
        ("llama_2_7b_bf16", LLAMA_7B),
        ("llama_2_7b_int8", LLAMA_7B + " --quantize int8"),
        ("llama_2_7b_int4_g128", LLAMA_7B + " --quantize int4-g128"),
        ("llama_2_7b_int4_g32", LLAMA_7B + " --quantize int4-g32"),
        ("llama_2_7b_int4_g128_kvint8", LLAMA_7B + " --quantize int4-g128 --kv-cache-dtype int8"),
        ("llama_3_8b_bf16", LLAMA_7B.replace("llama-2-7b", "llama-3-8b")),
    ], timeout_s=2400),
    *_cfgs("llama", "experiments.llama_tp", [("llama_2_7b_bf16_tp2", "--preset llama-2-7b --compile")],
           nproc=2, timeout_s=2400),
    # --- ViT (fastzoo and timm, every mode, in one run per model)
    *_cfgs("vit", "experiments.vit_throughput", [
        ("vit_quick", "--quick", QUICK),
        ("vit_base_patch16_224", "--models vit_base_patch16_224 --batches 1,32,256,1024"),
        ("vit_large_patch16_224", "--models vit_large_patch16_224 --batches 1,32,256,512,1024"),
        ("vit_large_patch16_384", "--models vit_large_patch16_384 --batches 1,32,256"),
    ]),
    # --- kernels against their references
    *_cfgs("ops", "experiments.bench_ops", [("bench_ops", "")]),
    *_cfgs("ops", "experiments.bench_weight_only_linear", [("weight_only_linear", "")]),
    *_cfgs("ops", "experiments.bench_int8_mm", [("int8_mm", "")]),
    *_cfgs("ops", "experiments.bench_rel_pos_attention", [("rel_pos_attention", "")]),
    *_cfgs("ops", "experiments.bench_decode_attention", [("decode_attention", ""),
                                                         ("decode_attention_kv_int8", "--kv-int8")]),
]


RESERVED = {"failures", "skipped", "summary"}  # file names of the runner's own outputs


def _check_table(configs: Sequence[Config]) -> None:
    names = [c.name for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"configuration names must be unique, repeated: {dup}")
    bad = [n for n in names if n in RESERVED or not re.fullmatch(r"[A-Za-z0-9_.-]+", n)]
    if bad:
        raise ValueError(f"configuration names must be letters, digits, '.', '_' or '-' and not one of "
                         f"{sorted(RESERVED)}, got {bad}")


_check_table(CONFIGS)


def select(configs: Sequence[Config], *, quick: bool, models: Iterable[str] = MODELS,
           only: Iterable[str] = ()) -> list[Config]:
    """The configurations of the quick or full set for ``models`` (or exactly ``only``), ceilings first."""
    only = list(only)
    known = {c.name for c in configs}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; known: {sorted(known)}")
    models = set(models)
    chosen = [c for c in configs
              if (c.name in only if only else (c.quick if quick else c.full) and c.model in models)]
    ceilings = [c for c in configs if c.model == "device"]
    return ceilings + [c for c in chosen if c.model != "device"]


def module_path(module: str, search: Sequence[Path]) -> Path | None:
    """The file ``python -m module`` would run from one of ``search``, without importing it."""
    rel = Path(*module.split("."))
    for root in search:
        for cand in (root / rel.with_suffix(".py"), root / rel / "__main__.py"):
            if cand.is_file():
                return cand
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(f.name, path)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()  # NVML query: no CUDA context in this process
    except Exception:
        return 0


@dataclass
class Runner:
    """Runs configurations into ``out``; see the module docstring."""
    out: Path
    budget_s: float | None = None
    force: bool = False
    python: str = sys.executable
    search_paths: Sequence[Path] = (harness.REPO_ROOT,)
    gpu_count: int | None = None
    progress: bool = True
    outcomes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.start = time.monotonic()
        self.failures = _read_json(self.out / "failures.json")
        self.skipped = _read_json(self.out / "skipped.json")

    # -- bookkeeping
    def record_path(self, cfg: Config) -> Path:
        return self.out / f"{cfg.name}.json"

    def _note(self, table: str, cfg: Config, entry: dict | None) -> None:
        for name, book in (("failures", self.failures), ("skipped", self.skipped)):
            book.pop(cfg.name, None)
            if name == table and entry is not None:
                book[cfg.name] = {"model": cfg.model, "module": cfg.module,
                                  "command": shlex.join(cfg.command()), **entry}
            _write_json(self.out / f"{name}.json", book)

    def remaining_s(self) -> float | None:
        return None if self.budget_s is None else self.budget_s - (time.monotonic() - self.start)

    # -- one configuration
    def run_one(self, cfg: Config) -> str:
        """Run ``cfg`` unless done / impossible; return 'done', 'ok', 'failed' or 'skipped'."""
        if self.record_path(cfg).exists() and not self.force:
            return "done"
        if module_path(cfg.module, self.search_paths) is None:
            self._note("skipped", cfg, {"reason": f"module {cfg.module} is not in this tree"})
            return "skipped"
        if cfg.nproc > 1:
            gpus = _gpu_count() if self.gpu_count is None else self.gpu_count
            if gpus < cfg.nproc:
                self._note("skipped", cfg, {"reason": f"needs {cfg.nproc} GPUs, {gpus} visible"})
                return "skipped"
        remaining = self.remaining_s()
        if remaining is not None and remaining <= 0:
            self._note("skipped", cfg, {"reason": "time budget spent before it started"})
            return "skipped"
        timeout = cfg.timeout_s if remaining is None else min(cfg.timeout_s, remaining)

        staging = self.out / ".staging" / cfg.name
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        log = self.out / "logs" / f"{cfg.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        launcher = ([self.python, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc-per-node={cfg.nproc}"] if cfg.nproc > 1 else [self.python])
        argv = [*launcher, "-m", "experiments.run_config", "--results-dir", str(staging),
                cfg.module, *cfg.args]
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([*map(str, self.search_paths),
                                               *filter(None, [os.environ.get("PYTHONPATH")])]))
        t0 = time.monotonic()
        with open(log, "w") as f:
            f.write(f"$ {shlex.join(argv)}\n")
            f.flush()
            proc = subprocess.Popen(argv, cwd=harness.REPO_ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, 9)  # the benchmark and anything it started (torchrun ranks)
                except ProcessLookupError:
                    pass
                rc = proc.wait()
                timed_out = True
        wall = time.monotonic() - t0
        records = sorted(staging.glob("*.json"))
        if cfg.record is not None and len(records) > 1:
            records = [r for r in records if r.stem == cfg.record] or records
        base = {"returncode": rc, "wall_s": round(wall, 1), "log": str(log.relative_to(self.out))}
        if timed_out:
            reason = f"timed out after {timeout:.0f} s"
        elif rc != 0:
            reason = f"exited with status {rc}"
        elif len(records) != 1:
            reason = (f"exited 0 but wrote {len(records)} records ({[r.name for r in records]}); "
                      "a configuration must write exactly one")
        else:
            self._save(cfg, records[0], wall)
            shutil.rmtree(staging, ignore_errors=True)
            self._note("failures", cfg, None)
            return "ok"
        if not records:
            shutil.rmtree(staging, ignore_errors=True)
        self._note("failures", cfg, {**base, "reason": reason,
                                     "partial_records": [str(r.relative_to(self.out)) for r in records],
                                     "log_tail": _tail(log)})
        return "failed"

    def _save(self, cfg: Config, staged: Path, wall: float) -> None:
        from experiments import report

        record = json.loads(staged.read_text())
        record["runner_command"] = record.get("command")
        record["command"] = shlex.join(cfg.command())
        record["config"] = cfg.name
        record["model"] = cfg.model
        record["wall_s"] = round(wall, 1)
        if cfg.model == "device":
            ceilings = report.ceilings_of([record])
        else:
            ceilings = report.ceilings_of(report.load_records(self.out))
        record["ceilings"] = ceilings
        record["pct_of_ceiling"] = report.pct_of_ceiling(record, ceilings)
        _write_json(self.record_path(cfg), record)

    # -- all of them
    def run(self, configs: Sequence[Config]) -> dict[str, str]:
        from tqdm import tqdm

        bar = tqdm(configs, desc="reproduce", unit="config", disable=not self.progress, file=sys.stderr)
        for cfg in bar:
            bar.set_postfix_str(cfg.name)
            outcome = self.run_one(cfg)
            self.outcomes[cfg.name] = outcome
            detail = (self.failures.get(cfg.name, {}).get("reason") if outcome == "failed"
                      else self.skipped.get(cfg.name, {}).get("reason") if outcome == "skipped" else "")
            bar.write(f"{cfg.name}: {outcome}" + (f" ({detail})" if detail else ""), file=sys.stderr)
        try:
            (self.out / ".staging").rmdir()  # only when no partial record is kept there
        except OSError:
            pass
        return self.outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, help="output folder (created; reused to resume)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--quick", action="store_true", help="the quick set: one short configuration per model")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="start no configuration after this many minutes; cut timeouts to what is left "
                        f"(default: none; {QUICK_BUDGET_MINUTES:g} with --quick)")
    p.add_argument("--only", nargs="+", default=(), metavar="NAME", help="run exactly these configurations")
    p.add_argument("--force", action="store_true", help="run configurations that already have a record")
    p.add_argument("--list", action="store_true", help="print the selected configurations and exit")
    p.add_argument("--no-report", action="store_true", help="do not write CSVs, charts and summary.md")
    args = p.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; expected a subset of {list(MODELS)}")
    try:
        configs = select(CONFIGS, quick=args.quick, models=models, only=args.only)
    except ValueError as e:
        p.error(str(e))
    if args.list:
        for c in configs:
            print(f"{c.name:32s} {c.model:6s} {shlex.join(c.command())}")
        return 0
    if args.out is None:
        p.error("--out DIR is required")
    if args.budget_minutes is None and args.quick:
        args.budget_minutes = QUICK_BUDGET_MINUTES
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        p.error(f"--budget-minutes must be positive, got {args.budget_minutes}")
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.out, budget_s=None if args.budget_minutes is None else 60 * args.budget_minutes,
                    force=args.force)
    outcomes = runner.run(configs)
    if not args.no_report:
        from experiments import report

        report.write_report(args.out, args.out)
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("ok", "done", "failed", "skipped")}
    print(f"reproduce: {counts['ok']} run, {counts['done']} already done, {counts['failed']} failed, "
          f"{counts['skipped']} skipped; results in {args.out}", file=sys.stderr)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
