#!/usr/bin/env bash
# Runs on the GPU machine (see docs/development.md): every test suite through
# CTest (the GPU suites against the CPU references included), the
# comparisons with Hugging Face transformers and PEFT (and bitsandbytes'
# NF4), the quickstart and its LoRA variant on the GPU, and with --bench the
# benchmarks of bench/. Logs and results go under $OUT.
#
# Stages: ctest quickstart resume dist-test parity chat generate peft peft-qwen3 peft-gemma3 peft-phi3 (default), plus bench
# (attention and full fine-tune), full-bench (full fine-tune alone; MT_FULL_ARGS adds bench/full_ft.py options), lora-bench, mezo-bench, galore-bench,
# lora-ops (mt_lora_bench: LoRA's fused A products against the composed ops), offload-bench, decode-bench, streaming-bench, profile (per-kernel time of a step; MT_PROFILE_MODES picks bench/profile_step.sh's modes, MT_PROFILE_SHAPE=7B its 7B shape) and plan (memtune plan against 36 measured runs) with --bench; attention-bench, long-context (bench/long_context.py; MT_LONG_ARGS adds its options) and int8-loss (bench/int8_moments.py: 8-bit offloaded moments against fp32 over 200 steps; MT_INT8_ARGS adds its options) alone; or name them: run.sh --stages
# "ctest mezo-bench". MT_CTEST_FILTER narrows ctest; MT_LORA_SHAPES picks
# lora-bench's shapes and MT_LORA_ARGS adds bench/lora_ft.py options (e.g.
# "--steps 20"); MT_MEZO_ARGS adds bench/mezo.py options, MT_GALORE_ARGS
# bench/galore.py's, MT_OFFLOAD_ARGS bench/offload.py's, MT_DECODE_ARGS bench/decode.py's, MT_STREAMING_ARGS bench/streaming.py's, MT_DIST_ARGS
# bench/dist.py's (stage dist, on a machine with 2 or more GPUs); MT_PARITY_ARGS tests/gpu/hf_parity.py's
# (e.g. "--only llama-1.1b,phi3-longrope-long"), MT_PLAN_ARGS tests/gpu/plan_check.py's; MT_RESUME_ONLY (a
# regular expression) picks resume checks by name.
# Python packages the machine lacks travel in .whl/ (see docs/development.md):
# .whl/bnb (bitsandbytes) and .whl/galore (galore-torch) always, .whl/peft
# only if peft does not import.
#
# Build on the development machine first (cmake -S . -B build &&
# cmake --build build && bash scripts/gpu-bundle.sh build) and carry `build`.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-/tmp/memtune-gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
BUILD=$ROOT/build
export MT_BUILD_DIR=$BUILD

# CTest's files name the source folder of the machine that configured the
# build: make that path lead here.
SRC=$(sed -n 's/^CMAKE_HOME_DIRECTORY:INTERNAL=//p' "$BUILD/CMakeCache.txt")
if [ -n "$SRC" ] && [ "$SRC" != "$ROOT" ] && [ ! -e "$SRC" ]; then
    mkdir -p "$(dirname "$SRC")" && ln -s "$ROOT" "$SRC"
fi

# Libraries the binaries need that this machine lacks: from the bundle, or
# from wherever this machine keeps them (CUDA's may live in Python packages).
mkdir -p /tmp/mt-libs
export LD_LIBRARY_PATH=/tmp/mt-libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# cuDNN: memtune is built against 9.19 (attention's graphs); PyTorch's wheel
# carries that version where the system's may be older: its folder goes first
cudnn_lib=$(python3 -c 'import os, nvidia.cudnn; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))' 2> /dev/null)
[ -n "$cudnn_lib" ] && [ -d "$cudnn_lib" ] && export LD_LIBRARY_PATH=$cudnn_lib:$LD_LIBRARY_PATH
for round in 1 2 3 4 5; do
    missing=$(for b in "$BUILD/memtune" "$BUILD"/tests/test_* "$BUILD/tests/mt_parity" "$BUILD"/mt_*_bench; do ldd "$b"; done |
              awk '/not found/{print $1}' | sort -u)
    [ -z "$missing" ] && break
    for lib in $missing; do
        if [ -e "$BUILD/gpu-libs/$lib" ]; then cp "$BUILD/gpu-libs/$lib" /tmp/mt-libs/
        else
            found=$(find /usr /opt -name "$lib" 2>/dev/null | head -1)
            [ -n "$found" ] && ln -sf "$found" /tmp/mt-libs/ || echo "run.sh: $lib not found anywhere"
        fi
    done
done
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; ldd "$BUILD/memtune"; } > "$OUT/env.txt" 2>&1
head -2 "$OUT/env.txt"

[ -d .whl/bnb ] && export PYTHONPATH=$ROOT/.whl/bnb${PYTHONPATH:+:$PYTHONPATH}
[ -d .whl/galore ] && export PYTHONPATH=$ROOT/.whl/galore${PYTHONPATH:+:$PYTHONPATH}
# galore-torch imports bitsandbytes at import time: without it every galore-torch run fails
if [ -d .whl/galore ] && ! python3 -c "import bitsandbytes" 2> /dev/null; then
    echo "run.sh: .whl/galore is here but bitsandbytes is not: galore-torch will not import; carry .whl/bnb too"
fi
if ! python3 -c "import peft" 2> /dev/null && [ -d .whl/peft ]; then
    export PYTHONPATH=$ROOT/.whl/peft${PYTHONPATH:+:$PYTHONPATH}
fi

STAGES="ctest quickstart resume dist-test parity chat generate peft peft-qwen3 peft-gemma3 peft-phi3"
case "${1:-}" in
    --bench) STAGES="$STAGES bench profile lora-bench lora-ops mezo-bench galore-bench offload-bench decode-bench streaming-bench plan" ;;
    --stages) STAGES=$2 ;;
esac
want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

status=0
# the stages that train on the bundled text say so when it was not carried (they would otherwise pass unrun)
for stage in quickstart resume dist int8-loss; do
    if want "$stage" && [ ! -f data/kjv.txt ]; then
        echo "== $stage: NOT RUN: data/kjv.txt is missing (scripts/quickstart.sh fetches it; carry it to the GPU machine)"
        status=1
    fi
done
if want ctest; then
    echo "== ctest (GPU suites run, CPU suites again)"
    # every suite's own output (the measurements the tests print) in ctest-verbose.log
    (cd "$BUILD" && CK_FORK=no ctest -V ${MT_CTEST_FILTER:+-R "$MT_CTEST_FILTER"} 2>&1) > "$OUT/ctest-verbose.log"
    [ $? -eq 0 ] || status=1
    grep -E '^[0-9]+/[0-9]+ Test|tests passed|FAILED|Failed' "$OUT/ctest-verbose.log" | tee "$OUT/ctest.log"
fi

if want quickstart && [ -f data/kjv.txt ]; then
    echo "== quickstart on the GPU"
    "$BUILD/memtune" tokenize --input data/kjv.txt --output /tmp/kjv.h5 &&
    "$BUILD/memtune" train configs/quickstart.yaml --set data.train=/tmp/kjv.h5 --set train.device=gpu \
        --set output.dir=/tmp/mt-quickstart --set train.sample_every=75 \
        --set "train.sample_prompts=And God said|In the beginning" 2>&1 | tee "$OUT/quickstart.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    # its samples (steps 0, 75, 150) decoded on the GPU, and the text changed as it trained
    python3 - /tmp/mt-quickstart/metrics.jsonl "$OUT/quickstart.log" <<'PY' || status=1
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"sample"' in line]
by = {(r["step"], r["sample_prompt"]): r["sample"] for r in rows}
log = open(sys.argv[2]).read()
ok = sorted({s for s, _ in by}) == [0, 75, 150] and len(by) == 6 and "decode on the CPU" not in log
ok = ok and all(by[(0, p)] != by[(150, p)] and by[(150, p)].strip() for p in ("And God said", "In the beginning"))
for k in sorted(by):
    print("quickstart sample", k, repr(by[k][:60]))
print("quickstart samples on the GPU:", "PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
    echo "== quickstart's LoRA variant on the GPU, then merge"
    # the Psalms: from the "Psalms 1" heading to the "Proverbs 1" one
    awk '/^Psalms 1$/{p=1} /^Proverbs 1$/{exit} p{print}' data/kjv.txt > /tmp/psalms.txt
    "$BUILD/memtune" tokenize --input /tmp/psalms.txt --output /tmp/psalms.h5 &&
    "$BUILD/memtune" train configs/quickstart-lora.yaml --set data.train=/tmp/psalms.h5 --set train.device=gpu \
        --set model.path=/tmp/mt-quickstart/model --set output.dir=/tmp/mt-quickstart-lora 2>&1 |
        tee "$OUT/quickstart-lora.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    rm -rf /tmp/mt-quickstart-merged
    "$BUILD/memtune" merge --model /tmp/mt-quickstart/model --adapter /tmp/mt-quickstart-lora/adapter \
        -o /tmp/mt-quickstart-merged || status=1
    echo "== quickstart's MeZO variant on the GPU"
    "$BUILD/memtune" train configs/quickstart-mezo.yaml --set data.train=/tmp/psalms.h5 --set train.device=gpu \
        --set model.path=/tmp/mt-quickstart/model --set output.dir=/tmp/mt-quickstart-mezo 2>&1 |
        tee "$OUT/quickstart-mezo.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    echo "== quickstart with AdamW's state offloaded to host memory, on the GPU"
    "$BUILD/memtune" train configs/quickstart.yaml --set data.train=/tmp/kjv.h5 --set train.device=gpu \
        --set output.dir=/tmp/mt-quickstart-offload --set offload.optimizer=cpu 2>&1 | tee "$OUT/quickstart-offload.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    echo "== quickstart's GaLore variant on the GPU"
    "$BUILD/memtune" train configs/quickstart-galore.yaml --set data.train=/tmp/psalms.h5 --set train.device=gpu \
        --set model.path=/tmp/mt-quickstart/model --set output.dir=/tmp/mt-quickstart-galore 2>&1 |
        tee "$OUT/quickstart-galore.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

# resume_check NAME STEPS STOP OUTPUT_FILE ARGS...: a run of STEPS steps,
# against one stopped after STOP and resumed; the losses must be identical
# bit for bit, and OUTPUT_FILE (under the run folder), when named, too.
resume_check() {
    local name=$1 steps=$2 stop=$3 file=$4
    shift 4
    # MT_RESUME_ONLY: a regular expression of the checks to run
    [ -n "${MT_RESUME_ONLY:-}" ] && [[ ! "$name" =~ $MT_RESUME_ONLY ]] && return 0
    rm -rf /tmp/mt-resume-ref /tmp/mt-resume-split
    "$BUILD/memtune" "$@" --set output.dir=/tmp/mt-resume-ref >> "$OUT/resume.log" 2>&1 &&
    "$BUILD/memtune" "$@" --set output.dir=/tmp/mt-resume-split --set train.stop_after="$stop" >> "$OUT/resume.log" 2>&1 &&
    "$BUILD/memtune" "$@" --set output.dir=/tmp/mt-resume-split --set train.resume=auto >> "$OUT/resume.log" 2>&1 &&
    diff <(grep -o '"loss":[^,]*' /tmp/mt-resume-ref/metrics.jsonl) <(grep -o '"loss":[^,]*' /tmp/mt-resume-split/metrics.jsonl) &&
    { [ -z "$file" ] || cmp "/tmp/mt-resume-ref/$file" "/tmp/mt-resume-split/$file"; } &&
    [ "$(grep -c '"loss"' /tmp/mt-resume-split/metrics.jsonl)" -eq "$steps" ] &&
    echo "$name resume on the GPU: $steps losses${file:+ and $file} identical" ||
        { echo "$name resume on the GPU: FAILED"; tail -5 "$OUT/resume.log"; status=1; }
}

if want resume && [ -f data/kjv.txt ]; then
    echo "== resume on the GPU: stopped and resumed vs uninterrupted, losses compared bit for bit"
    [ -f /tmp/kjv.h5 ] || "$BUILD/memtune" tokenize --input data/kjv.txt --output /tmp/kjv.h5 > /dev/null
    : > "$OUT/resume.log"
    resume_check full 40 15 "" train configs/quickstart.yaml --set data.train=/tmp/kjv.h5 --set train.device=gpu \
        --set train.steps=40 --set train.log_every=1 --set checkpoint.every=5
    echo "== ZeRO-2's streamed gradients in one process (a copy for the reduce) resume on the GPU"
    resume_check ZeRO-2 40 15 "" train configs/quickstart.yaml --set data.train=/tmp/kjv.h5 --set train.device=gpu \
        --set train.steps=40 --set train.log_every=1 --set checkpoint.every=5 --set dist.zero_stage=2 \
        --set train.grad_accum=2
    if [ -z "${MT_RESUME_ONLY:-}" ] || [[ ZeRO-2-vs-AdamW =~ $MT_RESUME_ONLY ]]; then
        # the same 40 steps without ZeRO: the losses agree (identical on an H100; the bound allows for summation order)
        "$BUILD/memtune" train configs/quickstart.yaml --set data.train=/tmp/kjv.h5 --set train.device=gpu \
            --set train.steps=40 --set train.log_every=1 --set checkpoint.every=5 --set train.grad_accum=2 \
            --set output.dir=/tmp/mt-zero0 >> "$OUT/resume.log" 2>&1 &&
        paste <(grep -o '"loss":[^,]*' /tmp/mt-zero0/metrics.jsonl | cut -d: -f2) \
            <(grep -o '"loss":[^,]*' /tmp/mt-resume-ref/metrics.jsonl | cut -d: -f2) |
            awk '{d = ($1 - $2) / $1; if (d < 0) d = -d; if (d > w) w = d; n++}
                 END {printf "ZeRO-2 in one process vs AdamW on the GPU: %d losses, largest relative difference %.3g\n", n, w;
                      exit !(n == 40 && w < 1e-2)}' ||
            { echo "ZeRO-2 vs AdamW on the GPU: FAILED"; status=1; }
    fi
    echo "== offloaded AdamW (state in a file, O_DIRECT) resume on the GPU"
    resume_check offload-ssd 40 15 "" train configs/quickstart.yaml --set data.train=/tmp/kjv.h5 \
        --set train.device=gpu --set train.steps=40 --set train.log_every=1 --set checkpoint.every=5 \
        --set offload.optimizer=ssd --set offload.path=/tmp/mt-offload-resume
    echo "== offloaded AdamW with the delayed parameter update (offload.delay 1) resume on the GPU, with and without clipping"
    resume_check offload-delay 40 15 "" train configs/quickstart.yaml --set data.train=/tmp/kjv.h5 \
        --set train.device=gpu --set train.steps=40 --set train.log_every=1 --set checkpoint.every=5 \
        --set offload.optimizer=cpu --set offload.delay=1
    resume_check offload-delay-noclip 40 15 "" train configs/quickstart.yaml --set data.train=/tmp/kjv.h5 \
        --set train.device=gpu --set train.steps=40 --set train.log_every=1 --set checkpoint.every=5 \
        --set offload.optimizer=cpu --set offload.delay=1 --set optim.grad_clip=0
    if { [ ! -f /tmp/mt-quickstart/model/model.safetensors ] || [ ! -f /tmp/psalms.h5 ]; } &&
        { [ -z "${MT_RESUME_ONLY:-}" ] || [[ QLoRA =~ $MT_RESUME_ONLY ]] || [[ MeZO =~ $MT_RESUME_ONLY ]] ||
            [[ GaLore =~ $MT_RESUME_ONLY ]]; }; then
        # (they would otherwise pass unrun)
        echo "== QLoRA, MeZO and GaLore resume: NOT RUN: they resume the quickstart stage's model (/tmp/mt-quickstart); run --stages \"quickstart resume\""
        status=1
    fi
    if [ -f /tmp/mt-quickstart/model/model.safetensors ] && [ -f /tmp/psalms.h5 ]; then
        echo "== QLoRA (dropout on) and MeZO (bf16 weights, stochastic rounding) resume on the GPU"
        resume_check QLoRA 30 12 adapter/adapter_model.safetensors train configs/quickstart-lora.yaml \
            --set model.path=/tmp/mt-quickstart/model --set data.train=/tmp/psalms.h5 --set train.device=gpu \
            --set model.quantize=nf4 --set train.steps=30 --set train.log_every=1 \
            --set model.activation_checkpointing=true --set model.offload_activations=true
        resume_check MeZO 30 12 model/model.safetensors train configs/quickstart-mezo.yaml \
            --set model.path=/tmp/mt-quickstart/model --set data.train=/tmp/psalms.h5 --set train.device=gpu \
            --set train.steps=30 --set train.log_every=1 --set mezo.samples=2
        # refreshes at steps 1, 11, 21; stopped between them
        resume_check GaLore 30 15 model/model.safetensors train configs/quickstart-galore.yaml \
            --set model.path=/tmp/mt-quickstart/model --set data.train=/tmp/psalms.h5 --set train.device=gpu \
            --set train.steps=30 --set train.log_every=1 --set galore.update_gap=10 --set galore.moments=int8
        # what GaLore does not project, with its AdamW state in a file
        resume_check GaLore-offload-ssd 30 15 model/model.safetensors train configs/quickstart-galore.yaml \
            --set model.path=/tmp/mt-quickstart/model --set data.train=/tmp/psalms.h5 --set train.device=gpu \
            --set train.steps=30 --set train.log_every=1 --set galore.update_gap=10 \
            --set offload.optimizer=ssd --set offload.path=/tmp/mt-offload-resume
    fi
fi

# py_stage STAGE SCRIPT LOG TITLE: SCRIPT --out $OUT when STAGE is wanted, its output also in $OUT/LOG
py_stage() {
    want "$1" || return 0
    echo "== $4"
    python3 "$2" --out "$OUT" "${@:5}" 2>&1 | tee "$OUT/$3"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
# shellcheck disable=SC2086
py_stage parity tests/gpu/hf_parity.py parity.log "parity with transformers" ${MT_PARITY_ARGS:-}
# shellcheck disable=SC2086
py_stage plan tests/gpu/plan_check.py plan_check.log "memtune plan's forecasts against measured GPU allocator peaks" \
    ${MT_PLAN_ARGS:-}
py_stage generate tests/gpu/generate_parity.py generate_parity.log \
    "memtune generate against transformers' generate (greedy, fp32, CPU)"
py_stage chat tests/gpu/chat_e2e.py chat_e2e.log \
    "a chat JSONL through memtune tokenize and LoRA training, answer-only loss, against transformers"
py_stage peft tests/gpu/peft_parity.py peft_parity.log "parity with PEFT (and bitsandbytes' NF4)"
py_stage peft-qwen3 tests/gpu/peft_parity.py peft_parity_qwen3.log "parity with PEFT on Qwen3 (and an NF4 base)" \
    --family qwen3
py_stage peft-gemma3 tests/gpu/peft_parity.py peft_parity_gemma3.log "parity with PEFT on Gemma 3 (and an NF4 base)" \
    --family gemma3
py_stage peft-phi3 tests/gpu/peft_parity.py peft_parity_phi3.log "parity with PEFT on Phi-3 (fused modules)" \
    --family phi3

if want attention-bench || want bench; then
    echo "== bench: the attention op (cuDNN path, own kernel) vs torch's SDPA backends"
    python3 bench/attention.py --out "$OUT" 2>&1 | tee "$OUT/attention_bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if want profile; then
    echo "== per-kernel time of one training step (bench/profile_step.sh ${MT_PROFILE_MODES:-})"
    # shellcheck disable=SC2086 # a list of modes
    OUT=$OUT bash bench/profile_step.sh ${MT_PROFILE_MODES:-} > "$OUT/profile.log" 2>&1
    [ $? -eq 0 ] || status=1
    grep '^###' "$OUT/profile.log"
fi
# shellcheck disable=SC2086 # the *_ARGS variables are lists of options
py_stage decode-bench bench/decode.py decode_bench.log "bench: decoding, memtune generate vs transformers' generate" \
    ${MT_DECODE_ARGS:-}
# shellcheck disable=SC2086
py_stage long-context bench/long_context.py long_context.log \
    "bench: the longest context per memory.budget next to Unsloth's table (Llama-3.1-8B shape, QLoRA r=32)" \
    ${MT_LONG_ARGS:-}
# shellcheck disable=SC2086
py_stage int8-loss bench/int8_moments.py int8_moments.log \
    "bench: 8-bit AdamW moments in the offload store against fp32 ones over a run" ${MT_INT8_ARGS:-}
# shellcheck disable=SC2086
py_stage streaming-bench bench/streaming.py streaming_bench.log \
    "bench: weights streamed from host memory (model.weights: cpu) vs resident" ${MT_STREAMING_ARGS:-}
if want bench || want full-bench; then
    echo "== bench: full fine-tune vs PyTorch (eager and torch.compile'd)"
    # shellcheck disable=SC2086
    python3 bench/full_ft.py --out "$OUT" --compile ${MT_FULL_ARGS:-} 2>&1 | tee "$OUT/bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want lora-ops; then
    echo "== bench: LoRA's fused A products vs the dropout and cuBLAS products they replace (mt_lora_bench)"
    "$BUILD/mt_lora_bench" 50 2>&1 | tee "$OUT/lora_ops.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if want lora-bench; then
    echo "== bench: LoRA and QLoRA vs PEFT (+ bitsandbytes)"
    python3 bench/lora_ft.py --out "$OUT" ${MT_LORA_SHAPES:+--shapes "$MT_LORA_SHAPES"} ${MT_LORA_ARGS:-} 2>&1 |
        tee "$OUT/lora_bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
# shellcheck disable=SC2086
py_stage mezo-bench bench/mezo.py mezo_bench.log "bench: MeZO vs PyTorch in-place MeZO and vs memtune's forward pass" \
    ${MT_MEZO_ARGS:-}
# shellcheck disable=SC2086
py_stage galore-bench bench/galore.py galore_bench.log "bench: GaLore vs memtune AdamW and galore-torch" \
    ${MT_GALORE_ARGS:-}
if want dist-test; then
    # tests/test_dist.sh on the GPU backend: NCCL's collectives, 2 ranks (on one
    # GPU through NCCL's socket transport when the machine has one)
    mode=gpu-shared
    [ "$(nvidia-smi -L | grep -c '^GPU')" -ge 2 ] && mode=gpu
    echo "== data parallelism over NCCL: tests/test_dist.sh, 2 ranks ($mode)"
    MT_DIST_DEVICE=$mode MT_DIST_LOGS=$OUT/dist-test bash tests/test_dist.sh "$BUILD/memtune" "$ROOT" \
        > "$OUT/dist-test.log" 2>&1
    [ $? -eq 0 ] || status=1
    grep '^test_dist' "$OUT/dist-test.log"
fi
if want dist; then
    echo "== data parallelism: loss curves on 2 GPUs vs 1, scaling efficiency (bench/dist.py)"
    nvidia-smi -L
    command -v mpirun && mpirun --version 2>&1 | head -1
    [ -f /tmp/kjv.h5 ] || "$BUILD/memtune" tokenize --input data/kjv.txt --output /tmp/kjv.h5 > /dev/null
    python3 bench/dist.py --out "$OUT" ${MT_DIST_ARGS:-} 2>&1 | tee "$OUT/dist_bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if want offload-bench; then
    echo "== bench: optimizer state on the GPU, in host memory, on disk; CPU AdamW vs torch's"
    python3 bench/offload.py --out "$OUT" ${MT_OFFLOAD_ARGS:-} 2>&1 | tee "$OUT/offload_bench.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
echo "run.sh: exit $status"
exit $status
