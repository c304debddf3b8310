#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests (bf16 and Muon included), the
# NCCL path of data-parallel training with one rank, attention's kernels alone
# (timed, and checked against the T x T path at full size), the GPU benchmark
# against PyTorch in fp16 and bf16 (eager, and torch.compile on gpt2-small) and
# nanoGPT's shakespeare-char run in bf16, with a summary in $OUT (default
# ./gpu-check). Uses the CuPy and PyTorch already
# installed there; needs no network.
#
#   OUT=/some/dir bash tools/gpu_check.sh
#   PARTS="compile speedrun" bash tools/gpu_check.sh       # only those parts
#
# The whole script stays within DEADLINE seconds (default 560, under the
# device's 10 minutes a command): the chosen parts run in the order below, each
# within its own limit and within what is left; a part that would not fit is
# skipped and the summary says so.
#
# PARTS: any of tests nccl probe bench train-bf16 compile (the default: what
# has never run on a GPU first, then the measurements; compile takes what is
# left, about 200 s) and sections graph dropout train-fp16 train-llama
# speedrun speedrun-bpe (a second call: PARTS="speedrun speedrun-bpe").
#
# DATA: the Tiny Shakespeare text for the training and speedrun parts and the
# tests that read it. The default is shared/data/tinyshakespeare.txt inside the
# checkout (a shared/ folder inside the checkout travels to the GPU machine;
# git ignores it), else ../shared/data/tinyshakespeare.txt. Before calling the
# device: mkdir -p shared/data && cp ../shared/data/tinyshakespeare.txt shared/data/
# ITERS: training steps (default 2500; nanoGPT's run reaches its best
# validation loss by about step 2000 of 5000); BENCH: extra bench_gpu.py flags.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
started=$(date +%s)
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH PYTHONUNBUFFERED=1
export XPMODEL_CACHE="${TMPDIR:-/tmp}/xpmodel-gpu-check-cache"
PY="${PYTHON:-python3}"
DEADLINE="${DEADLINE:-560}"
ITERS="${ITERS:-2500}"
PARTS="${PARTS:-tests nccl probe bench train-bf16 compile}"
read -r -a bench_flags <<< "${BENCH:-}"
summary="$OUT/summary.txt"
: > "$summary"

note() { echo "$*" | tee -a "$summary"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }
# A command within the part's limit: SIGINT first, so that pytest and Python
# print what they have (pytest its summary of failures), then SIGKILL 10 s later
# for one stuck in a driver or NCCL call.
limited() { timeout -s INT -k 10 "$limit" "$@"; }

# limit (global): the seconds a part may take, its own budget or what is left
# before DEADLINE; false (and a note) when fewer than 20 seconds would be left.
starts() {   # part name, its own budget in seconds
    local left=$(( DEADLINE - ($(date +%s) - started) - 5 ))
    limit=$(( $2 < left ? $2 : left ))
    if (( limit < 20 )); then
        note "== $1: skipped, ${left} s left of DEADLINE=${DEADLINE}"
        return 1
    fi
}

DATA="${DATA:-}"
if [[ -z "$DATA" ]]; then
    for candidate in shared/data/tinyshakespeare.txt ../shared/data/tinyshakespeare.txt; do
        [[ -f "$candidate" ]] && DATA="$candidate" && break
    done
fi
if [[ -n "$DATA" && -f "$DATA" ]]; then
    XPMODEL_SHARED_DATA="$(cd "$(dirname "$DATA")" && pwd)"
    export XPMODEL_SHARED_DATA
else
    note "no Tiny Shakespeare text (DATA='${DATA}'; looked in shared/data and ../shared/data):"
    note "the training and speedrun parts are skipped and the tests that read it skip"
    DATA=""
fi

train_run() {   # name, config, precision, log: ITERS steps on DATA, val loss and time to the summary
    [[ -n "$DATA" ]] || { note "skipped: no DATA"; return; }
    local start
    start=$(date +%s)
    limited "$PY" -m xpmodel.cli.main train --config "$2" --device cuda --quiet --overwrite \
        --out "${TMPDIR:-/tmp}/xpmodel-gpu-check-$1" data.source="$DATA" train.max_iters="$ITERS" \
        train.lr_decay_iters="$ITERS" train.precision="$3" > "$OUT/$4" 2>&1
    note "train exit code $?, $(( $(date +%s) - start )) s including data preparation"
    grep -E "val loss" "$OUT/$4" | tail -2 >> "$summary"
    tail -3 "$OUT/$4" >> "$summary"
}

note "== machine (parts: $PARTS)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$summary"
"$PY" -c "import cupy, torch, ml_dtypes; print('cupy', cupy.__version__, 'torch', torch.__version__, 'ml_dtypes', ml_dtypes.__version__)" 2>&1 | tee -a "$summary"

if want tests && starts tests 120; then   # about 90 s, most of it compiling kernels
    note "== GPU tests"
    # Only the tests' GPU variants: the CPU-emulator ones are for machines
    # without a GPU, and the CPU ones ran in CI.
    limited "$PY" -m pytest -q -p no:cacheprovider -k "not emulated and (gpu or cuda)" \
        tests/test_cuda_kernels.py tests/test_backends.py tests/test_bf16.py \
        tests/test_kernels_switch.py tests/test_muon.py tests/test_rope_heads_vectors.py \
        > "$OUT/tests.log" 2>&1
    code=$?
    note "tests exit code $code ($(tail -1 "$OUT/tests.log"))"
    (( code == 124 || code == 137 )) && note "the tests ran out of their ${limit} s; the parts below use flash attention as usual"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20 >> "$summary"
    if grep -qE "FAILED.*(flash|heads_of_64|grouped_query)" "$OUT/tests.log"; then
        export XPMODEL_FLASH=0
        note "the flash-attention tests failed: the rest runs with XPMODEL_FLASH=0"
    fi
fi

if want nccl && starts nccl 60; then   # about 30 s
    note "== data parallel through NCCL with one rank, against the CPU (tools/nccl_check.py)"
    if ! "$PY" -c "from mpi4py import MPI" 2> /dev/null; then
        note "skipped: mpi4py or the MPI library it loads is missing here (Open MPI, then pip install mpi4py)"
    else
        if command -v mpirun > /dev/null; then   # xpmodel's own launch line (Open MPI's flags as root)
            launch=("$PY" -c "import subprocess, sys; from xpmodel.distributed import local_mpirun
command, env = local_mpirun(1, [sys.executable, 'tools/nccl_check.py'])
sys.exit(subprocess.run(command, env=env).returncode)")
        else
            launch=("$PY" tools/nccl_check.py)   # mpi4py runs a singleton group of one rank
            note "(no mpirun here: one process as a singleton MPI group)"
        fi
        limited "${launch[@]}" > "$OUT/nccl.log" 2>&1
        note "nccl check exit code $?"
        cat "$OUT/nccl.log" >> "$summary"
    fi
fi

if want probe && starts probe 40; then   # about 30 s
    note "== attention alone: the flash kernels against the T x T path, timed and compared (tools/attention_probe.py)"
    limited "$PY" tools/attention_probe.py >> "$summary" 2>&1
    note "probe exit code $?"
fi

if want bench && starts bench 150; then   # about 130 s
    note "== benchmark in fp16 and bf16 (xpmodel vs PyTorch eager under autocast to the same type)"
    limited "$PY" tools/bench_gpu.py --precisions fp16 bf16 --configs char-mid gpt2-small llama-small \
        --kernels fused --compile-configs "${bench_flags[@]}" > "$OUT/bench.log" 2>&1
    note "bench exit code $?"
    cat "$OUT/bench.log" >> "$summary"
fi

if want train-bf16 && starts train-bf16 100; then   # about 70 s
    note "== shakespeare-char, bf16, $ITERS steps on $DATA (nanoGPT: val 1.4697)"
    train_run char-bf16 shakespeare-char bf16 train_bf16.log
fi

if want compile && starts compile 170; then   # about 150 s, compiling included
    note "== benchmark against torch.compile (gpt2-small, fp16 and bf16)"
    limited "$PY" tools/bench_gpu.py --precisions fp16 bf16 --configs gpt2-small \
        --kernels fused --compile-configs gpt2-small "${bench_flags[@]}" > "$OUT/bench_compile.log" 2>&1
    note "bench exit code $?"
    cat "$OUT/bench_compile.log" >> "$summary"
fi

if want sections && starts sections 60; then
    note "== where the step's time goes"
    for config in char-mid gpt2-small; do
        timeout -s INT -k 10 $(( limit / 2 )) "$PY" tools/gpu_sections.py --config "$config" \
            --kernels fused >> "$summary" 2>&1
    done
fi

if want graph && starts graph 20; then
    note "== can a CUDA graph capture the step? (tools/graph_probe.py)"
    limited "$PY" tools/graph_probe.py >> "$summary" 2>&1
fi

if want dropout && starts dropout 90; then   # about 70 s
    if (( limit < 60 )); then
        note "== dropout: skipped, ${limit} s left"
    else
        note "== shakespeare-char with dropout 0.2: attention alone, the flash kernels drawing the"
        note "   mask and through T x T scores, then the step against PyTorch's"
        timeout -s INT -k 10 $(( limit / 3 )) "$PY" tools/attention_probe.py \
            --configs shakespeare-char --dtypes float16 --dropout 0.2 >> "$summary" 2>&1
        note "probe exit code $?"
        timeout -s INT -k 10 $(( limit * 2 / 3 )) "$PY" tools/bench_gpu.py --precisions fp16 \
            --configs shakespeare-char --kernels fused --compile-configs "${bench_flags[@]}" \
            > "$OUT/bench_dropout.log" 2>&1
        note "bench exit code $?"
        cat "$OUT/bench_dropout.log" >> "$summary"
    fi
fi

if want train-fp16 && starts train-fp16 100; then
    note "== shakespeare-char, fp16, $ITERS steps on $DATA"
    train_run char-fp16 shakespeare-char fp16 train_fp16.log
fi

if want train-llama && starts train-llama 100; then
    note "== llama-char (Llama-style block), bf16, $ITERS steps"
    train_run llama-bf16 llama-char bf16 train_llama.log
fi

if want speedrun && starts speedrun 270; then   # about 4 minutes
    note "== time to val loss 1.47 at shakespeare-char size (tools/speedrun.py --size gpu)"
    if [[ -n "$DATA" ]]; then
        limited "$PY" tools/speedrun.py --size gpu --device cuda --data "$DATA" \
            --recipes gpt2-adamw speedrun --json "$OUT/speedrun.json" > "$OUT/speedrun.log" 2>&1
        note "speedrun exit code $?"
        tail -4 "$OUT/speedrun.log" >> "$summary"
    else
        note "skipped: no DATA"
    fi
fi

if want speedrun-bpe && starts speedrun-bpe 280; then   # about 4.5 minutes: the baseline's whole schedule sets the target
    note "== time to the BPE target on pystdlib (tools/speedrun.py --size bpe-gpu)"
    limited "$PY" tools/speedrun.py --size bpe-gpu --device cuda \
        --recipes gpt2-adamw speedrun --json "$OUT/speedrun_bpe.json" > "$OUT/speedrun_bpe.log" 2>&1
    note "speedrun-bpe exit code $?"
    tail -5 "$OUT/speedrun_bpe.log" >> "$summary"
fi

note "== done in $(( $(date +%s) - started )) s"
cat "$summary"
