#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests (bf16 included), the NCCL path
# of data-parallel training with one rank, the GPU benchmark against PyTorch in
# fp16 and bf16 (eager and torch.compile), attention's kernels alone, and
# nanoGPT's shakespeare-char run in bf16, with a summary in $OUT (default
# ./gpu-check). Uses the CuPy and PyTorch already installed there; needs no
# network. At most 10 minutes with the default PARTS (each part has its own
# time limit; the budgets are in the comments beside them).
#
#   OUT=/some/dir bash tools/gpu_check.sh
#   PARTS="tests bench" bash tools/gpu_check.sh        # only those parts
#
# PARTS: any of tests nccl bench compile probe train-bf16 (the default, about
# 9 minutes) and sections graph train-fp16 train-llama speedrun speedrun-bpe
# (left out by default: they do not fit in the same 10 minutes; sections and
# graph were measured in earlier versions, see tools/GPU_NOTES.md; a second
# call with PARTS="speedrun speedrun-bpe" fits in one).
# DATA: the Tiny Shakespeare text (default ../shared/data/tinyshakespeare.txt);
# ITERS: training steps (default 2500; nanoGPT's run reaches its best validation
# loss by about step 2000 of 5000); BENCH: extra benchmark flags.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XPMODEL_CACHE="${TMPDIR:-/tmp}/xpmodel-gpu-check-cache"
PY="${PYTHON:-python3}"
DATA="${DATA:-../shared/data/tinyshakespeare.txt}"
export XPMODEL_SHARED_DATA="$(dirname "$DATA")"
ITERS="${ITERS:-2500}"
PARTS="${PARTS:-tests nccl bench compile probe train-bf16}"
summary="$OUT/summary.txt"
: > "$summary"

note() { echo "$*" | tee -a "$summary"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

train_run() {   # name, config, precision, log: ITERS steps on DATA, val loss and time to the summary
    local start=$(date +%s)
    timeout 80 $PY -m xpmodel.cli.main train --config "$2" --device cuda --quiet --overwrite \
        --out "${TMPDIR:-/tmp}/xpmodel-gpu-check-$1" data.source="$DATA" train.max_iters=$ITERS \
        train.lr_decay_iters=$ITERS train.precision="$3" > "$OUT/$4" 2>&1
    note "train exit code $?, $(( $(date +%s) - start )) s including data preparation"
    grep -E "val loss" "$OUT/$4" | tail -2 >> "$summary"
    tail -3 "$OUT/$4" >> "$summary"
}

note "== machine (parts: $PARTS)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$summary"
$PY -c "import cupy, torch, ml_dtypes; print('cupy', cupy.__version__, 'torch', torch.__version__, 'ml_dtypes', ml_dtypes.__version__)" 2>&1 | tee -a "$summary"

if want tests; then   # about 90 s
    note "== GPU tests"
    # (the CPU-emulator variants of these tests are for machines without a GPU)
    timeout 100 $PY -m pytest -q -p no:cacheprovider -k "not emulated" tests/test_cuda_kernels.py \
        tests/test_backends.py tests/test_bf16.py tests/test_generate.py tests/test_architectures.py \
        tests/test_kernels_switch.py > "$OUT/tests.log" 2>&1
    note "tests exit code $? ($(tail -1 "$OUT/tests.log"))"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20 >> "$summary"
    if grep -qE "FAILED.*(flash|heads_of_64)" "$OUT/tests.log" || ! grep -qE "passed|failed" "$OUT/tests.log"; then
        export XPMODEL_FLASH=0
        note "the flash-attention tests failed or did not finish: the rest runs with XPMODEL_FLASH=0"
    fi
fi

if want nccl; then   # about 30 s
    note "== data parallel through NCCL with one rank, against the CPU (tools/nccl_check.py)"
    if command -v mpirun > /dev/null; then
        launch=(mpirun -n 1 --allow-run-as-root)
    else
        launch=()   # mpi4py runs a singleton group of one rank
        note "(no mpirun here: one process as a singleton MPI group)"
    fi
    timeout 60 "${launch[@]}" $PY tools/nccl_check.py > "$OUT/nccl.log" 2>&1
    note "nccl check exit code $?"
    cat "$OUT/nccl.log" >> "$summary"
fi

if want bench; then   # about 130 s
    note "== benchmark in fp16 and bf16 (xpmodel vs PyTorch eager under autocast to the same type)"
    timeout 140 $PY tools/bench_gpu.py --precisions fp16 bf16 --configs char-mid gpt2-small llama-small \
        --kernels fused --compile-configs ${BENCH:-} > "$OUT/bench.log" 2>&1
    note "bench exit code $?"
    cat "$OUT/bench.log" >> "$summary"
fi

if want compile; then   # about 150 s
    note "== benchmark against torch.compile (gpt2-small, fp16 and bf16; compiling takes a minute or two)"
    timeout 160 $PY tools/bench_gpu.py --precisions fp16 bf16 --configs gpt2-small \
        --kernels fused --compile-configs gpt2-small > "$OUT/bench_compile.log" 2>&1
    note "bench exit code $?"
    cat "$OUT/bench_compile.log" >> "$summary"
fi

if want probe; then   # about 30 s
    note "== attention alone: the flash kernels against the T x T path (tools/attention_probe.py)"
    timeout 40 $PY tools/attention_probe.py >> "$summary" 2>&1
    note "probe exit code $?"
fi

if want sections; then
    note "== where the step's time goes"
    for config in char-mid gpt2-small; do
        timeout 25 $PY tools/gpu_sections.py --config $config >> "$summary" 2>&1
    done
fi

if want graph; then
    note "== can a CUDA graph capture the step? (tools/graph_probe.py)"
    timeout 20 $PY tools/graph_probe.py >> "$summary" 2>&1
fi

if want train-bf16; then   # about 80 s
    note "== shakespeare-char, bf16, $ITERS steps on $DATA (nanoGPT: val 1.4697)"
    train_run char-bf16 shakespeare-char bf16 train_bf16.log
fi

if want train-fp16; then
    note "== shakespeare-char, fp16, $ITERS steps on $DATA"
    train_run char-fp16 shakespeare-char fp16 train_fp16.log
fi

if want train-llama; then
    note "== llama-char (Llama-style block), bf16, $ITERS steps"
    train_run llama-bf16 llama-char bf16 train_llama.log
fi
if want speedrun; then   # about 4 minutes
    note "== time to val loss 1.47 at shakespeare-char size (tools/speedrun.py --size gpu)"
    timeout 270 $PY tools/speedrun.py --size gpu --device cuda --data "$DATA" \
        --recipes gpt2-adamw speedrun --json "$OUT/speedrun.json" > "$OUT/speedrun.log" 2>&1
    note "speedrun exit code $?"
    tail -4 "$OUT/speedrun.log" >> "$summary"
fi

if want speedrun-bpe; then   # about 5 minutes: the baseline's whole schedule sets the target
    note "== time to the BPE target on pystdlib (tools/speedrun.py --size bpe-gpu)"
    timeout 320 $PY tools/speedrun.py --size bpe-gpu --device cuda \
        --recipes gpt2-adamw speedrun --json "$OUT/speedrun_bpe.json" > "$OUT/speedrun_bpe.log" 2>&1
    note "speedrun-bpe exit code $?"
    tail -5 "$OUT/speedrun_bpe.log" >> "$summary"
fi
cat "$summary"
