#!/usr/bin/env bash
# Tensor-parallel Llama decode, 1 vs 2 GPUs of one host (experiments/llama_tp.py).
#
#   scripts/tp_bench.sh OUTDIR [--budget S] [ROW ...]
#
# ROW is MODEL-WEIGHTS-wsN-MODE[-ALLREDUCE]: MODEL 7b (llama-2-7b), 70b (llama-2-70b shapes) or tiny,
# WEIGHTS bf16, int8 or int4 (int4-g128), N ranks, MODE compile (decode step compiled with CUDA
# graphs, as `fastzoo.llama.generate --compile`) or eager, ALLREDUCE auto (default: symm_mem where
# the GPUs reach each other peer-to-peer, else NCCL), nccl, symm_mem (one-shot all-reduce
# through symmetric memory) or lamport (one kernel, no barrier, the residual in it).  ROW
# allreduce-wsN is the all-reduce micro-benchmark (8 and 32 KB bf16, NCCL vs symm_mem vs
# lamport, CUDA-graph replay: one call, and chains of 64 dependent calls).  The default rows, in priority order: the
# micro-benchmark, 7B bf16 compiled on 1 GPU and on 2 with lamport, symm_mem and NCCL (the issue's
# 1.6x goal), then eager rows of every configuration (cheap: they show TP runs everywhere, 70B
# included), then the remaining compiled rows.
# Random weights, batch 1; every run (the 1-GPU ones too) goes through torchrun and the same code.
#
# Each row runs under `timeout`; a row whose estimated time exceeds the budget left (default
# 510 s) is skipped and listed at the end with the command that runs it.  NVLink multicast
# stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).
# Writes into OUTDIR: tp_bench.log, summary.txt (the final table) and results.tar.gz (the JSON
# records, experiments/results/<gpu>/llama_tp_*.json; extract at the repository root).
set -uo pipefail
OUTDIR=${1:?usage: scripts/tp_bench.sh OUTDIR [--budget S] [ROW ...]}
shift
BUDGET=510
if [ "${1:-}" = --budget ]; then BUDGET=${2:?--budget needs seconds}; shift 2; fi
DEFAULT_ROWS="allreduce-ws2 7b-bf16-ws1-compile 7b-bf16-ws2-compile-lamport 7b-bf16-ws2-compile-symm_mem 7b-bf16-ws2-compile-nccl
  70b-int8-ws2-eager 70b-int4-ws2-eager 7b-int8-ws1-eager 7b-int8-ws2-eager 7b-int4-ws1-eager 7b-int4-ws2-eager
  7b-bf16-ws1-eager 7b-bf16-ws2-eager
  7b-int8-ws1-compile 7b-int8-ws2-compile 7b-int4-ws1-compile 7b-int4-ws2-compile
  70b-int8-ws2-compile 70b-int4-ws2-compile"
ROWS=${*:-$DEFAULT_ROWS}

cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
LOG=$OUTDIR/tp_bench.log
: >"$LOG"
say() { echo "$*" | tee -a "$LOG"; }

NGPU=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -lt 2 ]; then
  echo "error: scripts/tp_bench.sh needs 2 CUDA GPUs of one host, found ${NGPU:-0}" >&2
  exit 2
fi
STAMP=$OUTDIR/.start
touch "$STAMP"
START=$(date +%s)
status=0
SKIPPED=""

run_row() {  # ROW LIMIT N ARGS...: one torchrun under timeout, logged; sets status on failure
  local row=$1 lim=$2 n=$3 t0 rc
  shift 3
  say "== $row: torchrun --nproc-per-node $n -m experiments.llama_tp $* (timeout ${lim} s)"
  t0=$(date +%s)
  timeout -k 15 "$lim" $PY -m torch.distributed.run --standalone --nproc-per-node "$n" -m experiments.llama_tp \
    "$@" 2>&1 | grep --line-buffered -v "^\s*$" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { say "== $row FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"; status=1; }
  say "== $row took $(($(date +%s) - t0)) s"
  find experiments/results -name 'llama_tp_*.json' -newer "$STAMP" -print0 | xargs -0r tar czf "$OUTDIR/results.tar.gz"
}

for row in $ROWS; do
  if [[ "$row" =~ ^allreduce-ws([2-8])$ ]]; then  # the all-reduce micro-benchmark: ~1 min
    n=${BASH_REMATCH[1]}
    if [ "$n" -gt "$NGPU" ]; then say "error: row '$row' needs $n GPUs, found $NGPU"; status=1; continue; fi
    left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 60 ]; then say "== skip $row (estimated 60 s, ${left} s of the budget left)"; SKIPPED="$SKIPPED $row"; continue; fi
    lim=$((left < 180 ? left : 180))
    run_row "$row" "$lim" "$n" --allreduce-bench --allreduce-kb 8 32
    continue
  fi
  IFS=- read -r model weights ws mode ar extra <<<"$row"
  case "$model" in 7b) preset=llama-2-7b ;; 70b) preset=llama-2-70b ;; tiny) preset=tiny ;; *) preset= ;; esac
  case "$weights" in bf16) wargs="--dtype bf16" ;; int8) wargs="--dtype bf16 --quantize int8" ;;
                     int4) wargs="--dtype bf16 --quantize int4-g128" ;; *) wargs= ;; esac
  case "$mode" in compile) margs="--compile --new-tokens 128 --runs 3" ;;
                  eager) margs="--no-compile --new-tokens 32 --runs 2" ;; *) margs= ;; esac
  n=${ws#ws}
  ar=${ar:-auto}
  if [ -z "$preset" ] || [ -z "$wargs" ] || [ -z "$margs" ] || [ -n "${extra:-}" ] || ! [[ "$n" =~ ^[12]$ ]] \
     || ! [[ "$ar" =~ ^(auto|nccl|symm_mem|lamport)$ ]]; then
    say "error: bad row '$row' (expected MODEL-WEIGHTS-wsN-MODE[-auto|nccl|symm_mem|lamport], e.g. 7b-int8-ws2-compile-symm_mem)"
    status=1; continue
  fi
  # estimated seconds (start-up, NCCL, set-up, compilation, runs) and the hard limit
  if [ "$mode" = compile ]; then est=$([ "$model" = 70b ] && echo 360 || echo 170); lim=$((est + 150))
  else est=$([ "$model" = 70b ] && echo 60 || echo 40); lim=$((est + 80)); fi
  left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt "$est" ]; then
    say "== skip $row (estimated ${est} s, ${left} s of the budget left)"; SKIPPED="$SKIPPED $row"; continue
  fi
  [ "$lim" -gt "$left" ] && lim=$left
  # shellcheck disable=SC2086
  run_row "$row" "$lim" "$n" --preset "$preset" $wargs $margs --allreduce "$ar"
done

say ""
say "== summary ($(($(date +%s) - START)) s; batch 1; GB/s/gpu: bytes of the rank's shard x tokens/s)"
mapfile -t FILES < <(find experiments/results -name 'llama_tp_*.json' -newer "$STAMP")
if [ "${#FILES[@]}" -gt 0 ]; then
  $PY -m experiments.llama_tp --summary "${FILES[@]}" | tee "$OUTDIR/summary.txt" | tee -a "$LOG"
else
  say "no results"
fi
if [ -n "$SKIPPED" ]; then
  say "not run (budget):$SKIPPED"
  say "run them with: scripts/tp_bench.sh OUTDIR2 [--budget S]$SKIPPED"
fi
rm -f "$STAMP"
exit $status
