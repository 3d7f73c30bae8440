#!/usr/bin/env bash
# The GPU checks in one command, for a short loan of a GPU: every step time-boxed, a failed step reported and passed,
# everything measured written under OUT, with OUT/summary.md the figures in one page.
#
#   bash benchmarks/gpu_check.sh OUT            # on a machine with CUDA: at most 8 minutes (the steps' limits sum to 480 s)
#   bash benchmarks/gpu_check.sh OUT --dry-run  # the same steps on the CPU with tiny shapes (under two minutes; CI runs it)
set -u
OUT=${1:?"usage: bash benchmarks/gpu_check.sh OUT_FOLDER [--dry-run]"}
DRY=${2:-}
if [ -n "$DRY" ] && [ "$DRY" != "--dry-run" ]; then echo "unknown option $DRY: give --dry-run or nothing" >&2; exit 2; fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
SUMMARY="$OUT/summary.md"
PY=${PYTHON:-python3} # the Python that holds torch, fastai and this library
AFD_BENCH=($PY benchmarks/run_afd_bench.py) # afd_bench, installed or not
START=$(date +%s)
FAILED=0

if [ -n "$DRY" ]; then
  DEVICE=cpu; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  BENCH=(--device cpu --bs 8 --size 16 --rounds 1 --steps 1 --warmup 1 --no_memory)
  EPOCH=(--device cpu --bs 16 --n_train 64 --n_valid 32)
  PRECISIONS=(fp32); SCALE=1 # time limits as on a GPU: the dry run checks the steps run, not how fast
  export AFD_GPU_METHODS=vanilla,dml,afd,ad # the precision tests of three kinds of method: the script's check, not the GPU's
else
  DEVICE=cuda
  BENCH=(--device cuda --bs 128 --size 32 --rounds 2 --steps 10 --warmup 3)
  EPOCH=(--device cuda --bs 128)
  PRECISIONS=(fp32 bf16); SCALE=1
fi
N_GPUS=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)

{
  echo "# GPU check$([ -n "$DRY" ] && echo ' (dry run on the CPU)')"
  echo
  echo "Started $(date -u '+%Y-%m-%d %H:%M UTC'); device $DEVICE; CUDA devices: $N_GPUS."
  echo
  echo '| step | result | seconds | limit |'
  echo '|---|---|---|---|'
} > "$SUMMARY"

step() { # step NAME LIMIT_SECONDS COMMAND...: run it time-boxed, its output in OUT/NAME.log, a row in the summary
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? t=$(( $(date +%s) - t0 )) result
  case $rc in
    0) result=ok ;;
    124|137) result="**timed out**"; FAILED=$((FAILED + 1)) ;;
    *) result="**failed** (exit $rc; see $name.log)"; FAILED=$((FAILED + 1)) ;;
  esac
  echo "| $name | $result | $t | $limit |" >> "$SUMMARY"
  echo "$name: $result in ${t}s"
}

step environment 10 $PY -c "
import sys, torch, fastai, fastcore, afd_fastai
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| fastai', fastai.__version__,
      '| fastcore', fastcore.__version__, '| afd_fastai', afd_fastai.__version__)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i); print(f'cuda:{i}', p.name, f'{p.total_memory / 2**30:.0f} GiB')
"
[ "$N_GPUS" -gt 0 ] && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# every registered method in fp16 and bf16, AFD's own GradScaler, AD's adversaries, a skipped overflowing step
step precision_tests 75 env AFD_DEVICE=$DEVICE $PY -m pytest -q tests/gpu_precision.py # every failure, not the first only

for p in "${PRECISIONS[@]}"; do # library and plain loop side by side: vanilla, DML, AFD (library defaults, then --paper)
  step bench_$p 45 "${AFD_BENCH[@]}" "${BENCH[@]}" --precision $p --out "$OUT/bench_$p"
  step bench_${p}_paper 40 "${AFD_BENCH[@]}" "${BENCH[@]}" --precision $p --paper --methods afd --out "$OUT/bench_${p}_paper"
done
step channels_last 45 "${AFD_BENCH[@]}" "${BENCH[@]}" --precision "${PRECISIONS[-1]}" --channels_last --no_plain --out "$OUT/channels_last"

# one CIFAR-100-shaped epoch of the AFD pair in bf16 (fp32 in the dry run) and the 300-epoch projection
# the goal: 300 epochs of it under 30 minutes (0.5 h) on one H100-class GPU
step epoch 45 "${AFD_BENCH[@]}" "${EPOCH[@]}" --epoch --precision "${PRECISIONS[-1]}" --models resnet32,wrn16_4 --methods afd --out "$OUT/epoch"

# last, with the most time: compiling (each network in training, then under no_grad for validation) takes the longest
if [ -z "$DRY" ]; then
  step compile 100 "${AFD_BENCH[@]}" "${BENCH[@]}" --precision "${PRECISIONS[-1]}" --compile --no_plain --no_memory --methods afd --out "$OUT/compile"
else
  echo "| compile | skipped in the dry run: compiling on the CPU takes minutes | 0 | – |" >> "$SUMMARY"
fi

if [ "$N_GPUS" -ge 2 ]; then # devices=, NCCL data parallel, SyncBatchNorm
  step two_gpus 35 $PY -m pytest -q tests/test_learner.py::test_peers_on_their_own_devices tests/test_distributed.py
else
  echo "| two_gpus | skipped: $N_GPUS CUDA device(s), the two-GPU tests need 2 | 0 | – |" >> "$SUMMARY"
fi

{
  echo
  echo "$FAILED step(s) failed or timed out; $(( $(date +%s) - START )) s in all."
  echo "The goal for the epoch step: 300 epochs of the AFD pair under 0.5 h on one H100-class GPU (its table's last column)."
  for f in environment.log bench_*/bench.md channels_last/bench.md compile/bench.md epoch/epoch.md; do
    for g in "$OUT"/$f; do [ -s "$g" ] && { echo; echo "## ${g#$OUT/}"; echo; cat "$g"; }; done
  done
} >> "$SUMMARY"
echo "summary: $SUMMARY"
exit $(( FAILED > 0 ))
