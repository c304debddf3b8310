#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests, the GPU benchmark and a short
# training run, with a summary in $OUT (default ./gpu-check). Uses the CuPy
# and PyTorch already installed there; needs no network. About 8 minutes.
#
#   OUT=/some/dir bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XPMODEL_CACHE="$OUT/cache"
PY="${PYTHON:-python3}"
summary="$OUT/summary.txt"
: > "$summary"

note() { echo "$*" | tee -a "$summary"; }

note "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$summary"
$PY -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" 2>&1 | tee -a "$summary"

note "== GPU tests"
timeout 180 $PY -m pytest -q -x tests/test_backends.py tests/test_model.py tests/test_generate.py \
    > "$OUT/tests.log" 2>&1
note "tests exit code $? ($(tail -1 "$OUT/tests.log"))"

note "== benchmark (xpmodel vs PyTorch eager AMP and torch.compile)"
timeout 240 $PY tools/bench_gpu.py --configs char-mid gpt2-small --steps 12 > "$OUT/bench.log" 2>&1
note "bench exit code $?"
cat "$OUT/bench.log" >> "$summary"

DATA=../shared/data/tinyshakespeare.txt
[ -f "$DATA" ] || DATA=pystdlib          # the Python standard library's source is everywhere
note "== short training run (shakespeare-char on $DATA, 300 steps, fp16)"
timeout 150 $PY -m xpmodel.cli train --config shakespeare-char --device cuda --quiet --overwrite \
    --out "$OUT/run" data.source="$DATA" train.max_iters=300 \
    train.eval_interval=150 train.sample_interval=0 train.precision=fp16 > "$OUT/train.log" 2>&1
note "train exit code $?"
tail -3 "$OUT/train.log" >> "$summary"
cat "$summary"
