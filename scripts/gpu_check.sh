#!/usr/bin/env bash
# Run fastzoo's GPU checks on a CUDA machine that already has torch (no internet needed).
#
#   scripts/gpu_check.sh OUTDIR [--tests PATHS] [--bench-timeout S] [BENCH ...]
#
# --tests PATHS: comma-separated test files or folders (default: tests); "none" skips them.
# --bench-timeout S: stop any one benchmark after S seconds (default 900).
#
# 1. the `cuda`-marked tests (tests whose optional dependency is missing are skipped,
#    with the reason in the log);
# 2. the benchmarks: experiments/<BENCH>.py for each BENCH given, by default all of
#    $DEFAULT_BENCHES that exist; each records a JSON under experiments/results/<gpu>/.
# Writes into OUTDIR: env.txt, pytest_cuda.log, bench.log, results.tar.gz (the JSON records).
#
# Missing Python packages (segment_anything, pycocotools, ...) can travel as wheels in
# .whl/ at the repository root: they are installed into a private folder first.
set -uo pipefail
OUTDIR=${1:?usage: scripts/gpu_check.sh OUTDIR [--tests PATHS] [--bench-timeout S] [BENCH ...]}
shift
TESTS=tests
BENCH_TIMEOUT=900
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) TESTS=${2:?--tests needs a value}; shift 2 ;;
    --bench-timeout) BENCH_TIMEOUT=${2:?--bench-timeout needs a value}; shift 2 ;;
    *) break ;;
  esac
done
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: scripts/gpu_check.sh needs a CUDA GPU visible to PyTorch ($PY)" >&2
  exit 2
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastzoo-site .whl/*.whl \
    && export PYTHONPATH=/tmp/fastzoo-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # run the tree as it is, no install

{
  nvidia-smi
  $PY - <<'PY'
import torch, platform
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"unavailable ({e})"
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "triton", tv)
print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
for mod in ["segment_anything", "transformers", "timm", "pycocotools", "sentencepiece", "tiktoken", "safetensors"]:
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "present"))
    except Exception as e:
        print(mod, "MISSING:", e)
PY
  git log -1 --oneline 2>/dev/null || true
} >"$OUTDIR/env.txt" 2>&1
cat "$OUTDIR/env.txt"

status=0
: >"$OUTDIR/pytest_cuda.log"
if [ "$TESTS" != none ]; then
  echo "== cuda tests: $TESTS"
  $PY -m pytest -m cuda -q -rs --durations=15 -p no:cacheprovider ${TESTS//,/ } 2>&1 | tee "$OUTDIR/pytest_cuda.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

DEFAULT_BENCHES="ceilings bench_ops bench_int8_mm bench_rel_pos_attention bench_weight_only_linear bench_decode_attention"  # models: python -m experiments.reproduce
BENCHES=${*:-$DEFAULT_BENCHES}
: >"$OUTDIR/bench.log"
for b in $BENCHES; do
  if [ ! -f "experiments/$b.py" ]; then
    echo "== skip $b (experiments/$b.py not in this tree)" | tee -a "$OUTDIR/bench.log"
    continue
  fi
  echo "== $b" | tee -a "$OUTDIR/bench.log"
  timeout "$BENCH_TIMEOUT" $PY -m "experiments.$b" 2>&1 | tee -a "$OUTDIR/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "== $b FAILED" | tee -a "$OUTDIR/bench.log"; status=1; }
  # after each benchmark, so that a run cut short still returns what it measured
  tar czf "$OUTDIR/results.tar.gz" experiments/results 2>/dev/null || true
done
echo "gpu_check finished with status $status; outputs in $OUTDIR"
exit $status
