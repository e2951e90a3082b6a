#!/usr/bin/env bash
# tools/gpu_check.sh: the CUDA path of this repository proven in one command, within about 8 minutes on one
# H100/H200: tests/test_cuda.py, then bench.py at 256-px latents (4 x 32 x 32, batch 32) for XL/2 and B/2 in
# TF32 (with the authors'-step baseline), bf16 and --compile. Writes one JSON file, prints a table.
#
#   bash tools/gpu_check.sh [--out FILE.json] [--budget SECONDS] [--only REGEX] [--cpu-smoke]
#
# --out       results (default gpu_check.json); each part's full output goes to FILE_logs/
# --budget    total seconds for all parts (default 480); each part also has its own budget below, enforced by
#             `timeout`. A part that does not fit in what is left is skipped, and the JSON and table say so
# --only      run only the parts whose name matches this extended regex, e.g. 'compile' for a second window
# --cpu-smoke the same bench invocations at a tiny size on the CPU (the default when CUDA is absent); --compile
#             then uses torch's "eager" backend (TORCH_COMPILE_OVERRIDE_BACKENDS), which traces with dynamo but
#             generates no kernels. The CUDA parts are reported as skipped
#
# Installs nothing beyond requirements-test.txt (which includes requirements.txt), and only if an import fails.
# Exit status: 0 when no part failed or timed out (skipped parts do not count), 1 otherwise.

set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=gpu_check.json
BUDGET=480
ONLY=""
SMOKE=0
while (( $# )); do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    *) echo "usage: bash tools/gpu_check.sh [--out FILE.json] [--budget S] [--only REGEX] [--cpu-smoke]" >&2
       exit 2 ;;
  esac
done
START=$(date +%s)
DEADLINE=$((START + BUDGET))
MIN_PART_S=20  # a part with less time than this left is skipped rather than started
LOGS="${OUT%.json}_logs"
rm -rf "$LOGS"
mkdir -p "$LOGS"
PARTS="$LOGS/parts.tsv"  # one line per part: name, kind, status, seconds, budget, reason, log file
: > "$PARTS"

if ! "$PYTHON" -c "import numpy, PIL, pytest, torch, tqdm" 2>/dev/null; then
  echo "== installing requirements-test.txt"
  "$PYTHON" -m pip install -q -r requirements-test.txt
fi
CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
if [[ $CUDA == 0 ]]; then
  SMOKE=1
fi
"$PYTHON" - > "$LOGS/meta.json" <<'EOF'
import json, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps(dict(torch=torch.__version__, cuda=cuda, cuda_version=torch.version.cuda,
                      python=platform.python_version(), gpus=torch.cuda.device_count(),
                      device=torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu")))
EOF

record() {  # name kind status seconds budget reason log
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$PARTS"
}

# run_part NAME KIND BUDGET_S COMMAND...: run COMMAND under `timeout`, with at most what the total budget leaves.
run_part() {
  local name=$1 kind=$2 budget=$3
  shift 3
  local log="$LOGS/$(echo "$name" | tr -c 'A-Za-z0-9\n' '_').log"
  if [[ -n $ONLY ]] && ! [[ $name =~ $ONLY ]]; then
    record "$name" "$kind" skipped 0 "$budget" "not selected by --only $ONLY" ""
    return
  fi
  local left=$((DEADLINE - $(date +%s)))
  if (( left < MIN_PART_S )); then
    record "$name" "$kind" skipped 0 "$budget" "total budget spent (${left}s left of ${BUDGET}s)" ""
    echo "== $name: skipped, ${left}s left of the total budget"
    return
  fi
  (( budget > left )) && budget=$left
  echo "== $name (budget ${budget}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$budget" "$@" > "$log" 2>&1
  local rc=$? status=passed reason=""
  if (( rc == 124 || rc == 137 )); then
    status=timeout reason="stopped after its ${budget}s budget"
  elif (( rc != 0 )); then
    status=failed reason="exit status $rc"
  fi
  record "$name" "$kind" "$status" $((SECONDS - t0)) "$budget" "$reason" "$log"
  echo "   $status in $((SECONDS - t0))s"
}

# 1. The CUDA tests (on a CPU they all skip: this proves the file imports and collects).
run_part "tests/test_cuda.py" tests 220 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py

# 2. bench.py, most important first: eager XL/2 and B/2, then the compiled runs, which spend most of their
# budget compiling (warmup_s).
if (( SMOKE )); then
  MODELS=(T/2)  # stands in for both
  SHAPE=(--image-size 8 --in-channels 4 --num-classes 10 --batch-size 2 --steps 1 --warmup 1 --device cpu)
  BENCH_BUDGET=(60 60 60)
  export TORCH_COMPILE_OVERRIDE_BACKENDS=">=0:eager" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  PREFIX="cpu-smoke "
  for model in XL/2 B/2; do
    for mode in tf32 bf16 compile; do
      record "bench $model $mode" bench skipped 0 0 "no CUDA" ""
    done
  done
else
  MODELS=(XL/2 B/2)
  SHAPE=(--image-size 32 --in-channels 4 --num-classes 1000 --batch-size 32 --steps 5 --warmup 2 --device cuda)
  BENCH_BUDGET=(75 50 150)  # tf32 + baseline, bf16, compile (XL/2; B/2 builds faster and takes less)
  PREFIX=""
fi
for model in "${MODELS[@]}"; do
  run_part "${PREFIX}bench $model tf32" bench "${BENCH_BUDGET[0]}" \
    "$PYTHON" bench.py --model "$model" "${SHAPE[@]}" --precision tf32 --baseline
  run_part "${PREFIX}bench $model bf16" bench "${BENCH_BUDGET[1]}" \
    "$PYTHON" bench.py --model "$model" "${SHAPE[@]}" --precision bf16
done
for model in "${MODELS[@]}"; do
  run_part "${PREFIX}bench $model compile" bench "${BENCH_BUDGET[2]}" \
    "$PYTHON" bench.py --model "$model" "${SHAPE[@]}" --precision tf32 --compile
done

"$PYTHON" tools/gpu_check_report.py --parts "$PARTS" --meta "$LOGS/meta.json" --out "$OUT" \
  --budget "$BUDGET" --elapsed $(($(date +%s) - START)) --mode "$([[ $SMOKE == 1 ]] && echo cpu-smoke || echo gpu)"
