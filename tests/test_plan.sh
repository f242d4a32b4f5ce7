#!/usr/bin/env bash
# memtune plan against real runs: for configurations of the quickstart model
# on the CPU (full AdamW, checkpointing, offloaded activations, LoRA, QLoRA,
# MeZO on all weights and on adapters, GaLore alone and with offload, AdamW
# state in host memory (all of it, or half with offload.ratio) and on disk,
# accumulation, micro-batch sizes), every
# category `memtune plan --device cpu` forecasts equals the peak the run's
# memory report gives (to its 0.1 MiB). Then the 7B configs of configs/
# forecast for the GPU with configs/models/llama-2-7b's shape (no weights
# needed), and a combination the trainer refuses is refused the same way.
# usage: test_plan.sh MEMTUNE ROOT
set -uo pipefail
MEMTUNE=$1
ROOT=$2
W=$(mktemp -d /tmp/memtune-plan-XXXXXX)
trap 'rm -rf "$W"' EXIT
fail() {
    echo "test_plan: FAIL: $*"
    exit 1
}
# grep -q that reads all its input first: with pipefail, `echo "$out" | grep -q` fails at random when grep exits
# on a match before echo has written the rest (SIGPIPE)
gq() {
    local text
    text=$(cat)
    grep -q "$@" <<< "$text"
}
cd "$ROOT" || exit 1
printf 'In the beginning was the word.\n\nAnd the word was with the model.\n' > "$W/text.txt"
for i in $(seq 200); do printf 'line %d of some text for a few windows of tokens to train on\n' "$i"; done >> "$W/text.txt"
"$MEMTUNE" tokenize --input "$W/text.txt" --output "$W/data.h5" --quiet > /dev/null || fail "tokenize"
base=(configs/quickstart.yaml --set "data.train=$W/data.h5" --set train.seq_len=64 --set train.micro_batch=4
      --set train.steps=2 --set optim.warmup_steps=0 --set train.device=cpu --set train.eval_every=0
      --set data.eval_fraction=0 --set checkpoint.every=0 --set checkpoint.final=false)

# "weights 3.1 MiB (peak 3.1), grads ..." -> "weights 3.1\ngrads ..."
run_peaks() { grep -o 'memory (host): .*' | sed 's/memory (host): //; s/ MiB (peak \([0-9.]*\))/ \1/g' | tr ',' '\n' |
    sed 's/^ //' | awk '{print $1, $3}'; }
# (the disk lines give a file's size and the free space: the run's tally does not count the file; test_lora checks it holds those inputs)
plan_peaks() { awk '/^category/{on=1; next} on && /^peak/{exit} on && NF && $1 != "disk" && $1 !~ /^\(/ {print $1, $2}'; }

n=0
check() {
    local name=$1
    shift
    local run plan
    run=$("$MEMTUNE" train "${base[@]}" "$@" --set "output.dir=$W/run-$n" 2>&1 | run_peaks) || true
    [ -n "$run" ] || fail "$name: the run printed no memory report"
    plan=$("$MEMTUNE" plan "${base[@]}" "$@" --device cpu 2>&1 | plan_peaks)
    [ -n "$plan" ] || fail "$name: memtune plan printed no forecast"
    if [ "$run" != "$plan" ]; then
        echo "--- run:"
        echo "$run"
        echo "--- plan:"
        echo "$plan"
        fail "$name: the forecast differs from the run's peaks"
    fi
    echo "test_plan: $name: $(echo "$plan" | tr '\n' ' ')(MiB) as the run"
    n=$((n + 1))
}

check "AdamW"
check "AdamW, checkpointing" --set model.activation_checkpointing=true
check "AdamW, offloaded activations" --set model.activation_checkpointing=true --set model.offload_activations=true
check "AdamW, offloaded activations, 2 kept" --set model.activation_checkpointing=true --set model.offload_activations=true \
    --set model.gpu_layer_inputs=2
check "AdamW, offloaded activations, the last 2 in a file" --set model.activation_checkpointing=true \
    --set model.offload_activations=true --set model.ssd_layer_inputs=2 --set "offload.path=$W/inputs"
check "AdamW, accumulation 3, micro-batch 2" --set train.grad_accum=3 --set train.micro_batch=2
check "LoRA r=16" --set lora.r=16
check "QLoRA r=8, checkpointing" --set lora.r=8 --set model.quantize=nf4 --set model.activation_checkpointing=true
check "MeZO" --set optim.kind=mezo
check "MeZO on adapters" --set optim.kind=mezo --set lora.r=8
check "AdamW, packed documents" --set data.document_mask=true
# the other families' layers, from a config.json alone (random init)
family() { mkdir -p "$W/$1" && echo "$2" > "$W/$1/config.json"; }
family qwen3 '{"architectures":["Qwen3ForCausalLM"],"vocab_size":258,"hidden_size":64,"intermediate_size":172,
  "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,"tie_word_embeddings":true}'
family gemma3 '{"architectures":["Gemma3ForCausalLM"],"vocab_size":258,"hidden_size":64,"intermediate_size":172,
  "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":32,"query_pre_attn_scalar":32,
  "sliding_window":16,"sliding_window_pattern":2}'
family phi3 '{"architectures":["Phi3ForCausalLM"],"vocab_size":258,"hidden_size":64,"intermediate_size":172,
  "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2}'
check "Qwen3, LoRA r=8" --set "model.path=$W/qwen3" --set lora.r=8
check "Gemma 3, checkpointing" --set "model.path=$W/gemma3" --set model.activation_checkpointing=true
check "Gemma 3, MeZO" --set "model.path=$W/gemma3" --set optim.kind=mezo
check "Phi-3, QLoRA r=8" --set "model.path=$W/phi3" --set lora.r=8 --set model.quantize=nf4
check "GaLore r=16" --set optim.kind=galore --set optim.grad_clip=0 --set galore.rank=16
check "GaLore r=16, int8 moments, offload" --set optim.kind=galore --set optim.grad_clip=0 --set galore.rank=16 \
    --set galore.moments=int8 --set offload.optimizer=cpu
check "AdamW state in host memory" --set offload.optimizer=cpu --set train.grad_accum=2
check "AdamW state in host memory, int8 moments" --set offload.optimizer=cpu --set offload.moments=int8
check "AdamW state half in host memory" --set offload.optimizer=cpu --set offload.ratio=0.5
check "AdamW state half in host memory, accumulation 2" --set offload.optimizer=cpu --set offload.ratio=0.5 \
    --set train.grad_accum=2
check "GaLore r=16, offload with int8 moments" --set optim.kind=galore --set optim.grad_clip=0 --set galore.rank=16 \
    --set offload.optimizer=cpu --set offload.moments=int8
check "AdamW state on disk" --set offload.optimizer=ssd --set "offload.path=$W/ssd"
check "AdamW state on disk, int8 moments" --set offload.optimizer=ssd --set "offload.path=$W/ssd" \
    --set offload.moments=int8

# memory.budget: the fastest setting that keeps the training and fits, and the
# run then holds no more than the budget; a budget nothing fits is refused
out=$("$MEMTUNE" train "${base[@]}" --set memory.budget=16MiB --set "output.dir=$W/budget" 2>&1) ||
    fail "memory.budget 16MiB: the run failed: $out"
echo "$out" | gq "memory.budget 16MiB (16.0 MiB): the configuration needs .* running with" ||
    fail "memory.budget 16MiB: no line saying what it chose: $out"
total=$(echo "$out" | run_peaks | awk '{s += $2} END {print s}')
awk -v t="$total" 'BEGIN {exit !(t <= 16.0)}' || fail "memory.budget 16MiB: the run held $total MiB"
echo "test_plan: memory.budget 16MiB: $(echo "$out" | grep -o 'running with [^(]*')held $total MiB"
out=$("$MEMTUNE" train "${base[@]}" --set memory.budget=2MiB --set "output.dir=$W/budget2" 2>&1)
[ $? -eq 1 ] && echo "$out" | gq "no setting that keeps this training fits: the smallest" ||
    fail "memory.budget 2MiB: expected a refusal naming the smallest setting: $out"
[ ! -e "$W/budget2/model" ] || fail "memory.budget 2MiB: a refused run wrote a model"

# train.seq_len: max: the longest length whose forecast fits the budget; the
# run holds no more, one more token would not fit; refused without a budget
out=$("$MEMTUNE" train "${base[@]}" --set train.seq_len=max --set memory.budget=24MiB --set "output.dir=$W/max" 2>&1) ||
    fail "train.seq_len max: the run failed: $out"
len=$(echo "$out" | sed -n 's/.*train.seq_len max: \([0-9]*\) tokens.*/\1/p')
[ -n "$len" ] && echo "$out" | gq "T=$len " || fail "train.seq_len max: no length chosen and used: $out"
total=$(echo "$out" | run_peaks | awk '{s += $2} END {print s}')
awk -v t="$total" 'BEGIN {exit !(t <= 24.0)}' || fail "train.seq_len max: the run at T=$len held $total MiB"
# one token more: the forecast's own verdict against 24 MiB (its printed size is rounded to 0.1 MiB)
more=$("$MEMTUNE" plan "${base[@]}" --device cpu --set "train.seq_len=$((len + 1))" --gpu-memory 24MiB 2>&1 |
    awk '/^peak/{print; exit}')
echo "test_plan: train.seq_len max under 24MiB: T=$len, held $total MiB (T=$((len + 1)): $more)"
echo "$more" | gq "does NOT fit" || fail "T=$((len + 1)) fits too: $more"
out=$("$MEMTUNE" train "${base[@]}" --set train.seq_len=max --set "output.dir=$W/max2" 2>&1)
[ $? -eq 1 ] && echo "$out" | gq "train.seq_len: max takes the longest length that fits memory.budget" ||
    fail "train.seq_len max without a budget: expected a refusal: $out"

# a configuration with offload.* keys that other modes do not take (part of
# the state offloaded, int8 moments): its alternatives without offload, with
# GaLore or with the base streamed go back to those keys' defaults rather than
# being refused, and "AdamW state in host memory" offloads all of it
out=$("$MEMTUNE" plan configs/full-offload-cpu.yaml --set model.path=configs/models/llama-2-7b --set offload.ratio=0.25 \
    --set offload.moments=int8 --gpu-memory 80GiB --host-memory 120GiB 2>&1) || fail "plan with offload.ratio: $out"
for alt in "LoRA r=16, all linear" "QLoRA (NF4) r=16 + checkpointing" "GaLore r=128 + checkpointing" \
    "MeZO (all weights)" "base in host memory, streamed"; do
    echo "$out" | grep -F "$alt" | gq " yes " || fail "plan with offload.ratio: $alt not offered: $out"
done
configured=$(echo "$out" | awk '/^as configured/{print $3}')
everything=$(echo "$out" | awk '/^AdamW state in host memory \+ ckpt/{print $8}')
[ -n "$everything" ] && awk -v a="$everything" -v b="$configured" 'BEGIN {exit !(a < b / 2)}' ||
    fail "plan with offload.ratio 0.25: all of the state offloaded should need far less than $configured GiB: $out"
echo "test_plan: offload.ratio 0.25 + int8: alternatives offered; all offloaded $everything GiB against $configured"

# train.seq_len: max may put the MLP in tiles when that fits a longer
# length (QLoRA 7B on 8 GiB); the alternatives are forecast at that length
out=$("$MEMTUNE" plan configs/llama-qlora.yaml --set model.path=configs/models/llama-2-7b --set train.seq_len=max \
    --gpu-memory 8GiB 2>&1) || fail "train.seq_len max on 8GiB: memtune plan failed: $out"
chosen=$(echo "$out" | sed -n 's/^train.seq_len max: \([0-9]*\) tokens, the longest that fits with the MLP in tiles.*/\1/p')
untiled=$(echo "$out" | sed -n 's/^longest train.seq_len that fits as configured: //p')
[ -n "$chosen" ] && [ -n "$untiled" ] && [ "$chosen" -gt "$untiled" ] ||
    fail "train.seq_len max on 8GiB: expected tiles and a length above the untiled $untiled: $out"
echo "$out" | gq "refused: train.seq_len: max" && fail "train.seq_len max: alternatives refused: $out"
echo "test_plan: train.seq_len max, QLoRA 7B on 8GiB: T=$chosen with the MLP in tiles ($untiled without)"
# ... and, for LoRA's AdamW, the adapters' state in host memory: the length it reports is the one that
# configuration fits (one token more does not); a full fine-tune is not offered it (its host update is slow)
echo "$out" | gq "^train.seq_len max: $chosen tokens.* and the adapters' AdamW state in host memory" ||
    fail "train.seq_len max on 8GiB: expected the adapters' state offloaded: $out"
fits() {
    "$MEMTUNE" plan configs/llama-qlora.yaml --set model.path=configs/models/llama-2-7b --set model.mlp_tile_rows=2048 \
        --set offload.optimizer=cpu --set "train.seq_len=$1" --gpu-memory 8GiB 2>&1 | gq "^peak .*: fits"
}
fits "$chosen" && ! fits $((chosen + 1)) || fail "train.seq_len max on 8GiB: $chosen is not the longest that fits"
out=$("$MEMTUNE" plan configs/llama-qlora.yaml --set model.path=configs/models/tinyllama-1.1b --set model.quantize=none \
    --set lora.r=0 --set model.activation_checkpointing=true --set train.seq_len=max --gpu-memory 24GiB 2>&1)
echo "$out" | gq "^train.seq_len max: [0-9]* tokens" && ! echo "$out" | gq "AdamW state in host memory (off" ||
    fail "train.seq_len max, full fine-tune: expected no offload choice: $out"
echo "test_plan: train.seq_len max, QLoRA 7B on 8GiB: the adapters' AdamW state offloaded; a full fine-tune not"
# with model.weights auto, where the base does not fit resident (QLoRA 7B on 4GiB), train.seq_len: max streams it
# and weighs the other choices with it streamed: the length is the one that configuration fits (one token more does
# not), far above what resident weights leave
out=$("$MEMTUNE" plan configs/llama-qlora.yaml --set model.path=configs/models/llama-2-7b --set train.seq_len=max \
    --set model.weights=auto --gpu-memory 4GiB --host-memory 120GiB 2>&1) ||
    fail "train.seq_len max, model.weights auto on 4GiB: memtune plan failed: $out"
streamed=$(echo "$out" | sed -n 's/^train.seq_len max: \([0-9]*\) tokens, the longest that fits with the MLP in tiles.*and the base.s layers streamed from host memory (model.weights auto: cpu)$/\1/p')
[ -n "$streamed" ] || fail "train.seq_len max, model.weights auto on 4GiB: expected the base streamed: $out"
resident=$("$MEMTUNE" plan configs/llama-qlora.yaml --set model.path=configs/models/llama-2-7b --set train.seq_len=max \
    --gpu-memory 4GiB --host-memory 120GiB 2>&1 | sed -n 's/^train.seq_len max: \([0-9]*\) tokens.*/\1/p')
[ "$streamed" -gt $((10 * ${resident:-0})) ] ||
    fail "train.seq_len max on 4GiB: $streamed tokens streamed against ${resident:-none} resident"
echo "$out" | gq "^longest train.seq_len that fits as configured\|^no train.seq_len fits as configured" ||
    fail "train.seq_len max, model.weights auto: no as-configured line: $out"
streams() {
    "$MEMTUNE" plan configs/llama-qlora.yaml --set model.path=configs/models/llama-2-7b --set model.mlp_tile_rows=2048 \
        --set offload.optimizer=cpu --set model.weights=cpu --set "train.seq_len=$1" --gpu-memory 4GiB \
        --host-memory 120GiB 2>&1 | gq "^peak .*: fits"
}
streams "$streamed" && ! streams $((streamed + 1)) ||
    fail "train.seq_len max, model.weights auto on 4GiB: $streamed is not the longest the streamed run fits"
# ... and at a configured length, memtune plan's last lines search as train.seq_len: max would (auto's choice at
# that length, 3 layers resident, is not held fixed)
out=$("$MEMTUNE" plan configs/llama-qlora.yaml --set model.path=configs/models/llama-2-7b --set model.weights=auto \
    --gpu-memory 4GiB --host-memory 120GiB 2>&1)
echo "$out" | tail -1 | gq "the base's layers streamed from host memory (model.weights auto: cpu): $streamed\$" ||
    fail "model.weights auto at T=1024 on 4GiB: the longest length is not train.seq_len max's $streamed: $out"
echo "test_plan: train.seq_len max, model.weights auto, QLoRA 7B on 4GiB: T=$streamed streamed (${resident:-none} resident)"
# memory.budget below the GPU's memory bounds the plan as it bounds the run: on 24GiB with a budget of 8GiB the
# same length as on 8GiB, and the peak set against the budget
out=$("$MEMTUNE" plan configs/llama-qlora.yaml --set model.path=configs/models/llama-2-7b --set train.seq_len=max \
    --set memory.budget=8GiB --gpu-memory 24GiB 2>&1)
echo "$out" | gq "^train.seq_len max: $chosen tokens" && echo "$out" | gq "of 8.0 GiB (memory.budget 8GiB)" ||
    fail "train.seq_len max with memory.budget 8GiB on 24GiB: expected T=$chosen against the budget: $out"
# a configuration refused at any length says why, not that nothing fits
out=$("$MEMTUNE" plan configs/llama-qlora.yaml --set model.path=configs/models/llama-2-7b --set train.seq_len=max \
    --set train.steps=2 --gpu-memory 8GiB 2>&1)
echo "$out" | gq "optim.warmup_steps (30) must be below train.steps (2)" ||
    fail "train.seq_len max with warmup past the steps: expected that error: $out"
echo "test_plan: memory.budget bounds memtune plan below --gpu-memory; a refused configuration names its key"

# model.weights: auto keeps the base on the GPU where the run fits and streams it from host memory where it does
# not (QLoRA 7B needs 6.6 GiB resident, 3.7 GiB streamed, 3.6 GiB of host memory); ssd puts it on disk
q7=(configs/llama-qlora.yaml --set model.path=configs/models/llama-2-7b)
out=$("$MEMTUNE" plan "${q7[@]}" --set model.weights=auto --gpu-memory 24GiB 2>&1)
echo "$out" | gq "^model.weights auto: gpu (the run fits" || fail "model.weights auto on 24GiB: $out"
out=$("$MEMTUNE" plan "${q7[@]}" --set model.weights=auto --gpu-memory 4GiB 2>&1)
echo "$out" | gq "^model.weights auto: cpu (resident it needs" || fail "model.weights auto on 4GiB: $out"
# ... and the alternatives resolve auto as their runs would: "as configured" is the forecast above it
peak=$(echo "$out" | awk '/^peak/ {print $2, $3; exit}')
echo "$out" | gq "^as configured  *$peak  *yes" || fail "model.weights auto on 4GiB: as configured is not $peak: $out"
# ... and keeps on the GPU the first layers that fit beside the streamed rest: the most that fit (one more does not)
out=$("$MEMTUNE" plan "${q7[@]}" --set model.weights=auto --gpu-memory 5GiB --brief 2>&1)
kept=$(echo "$out" | sed -n 's/^model.weights auto: cpu (.* keeping the first \([0-9]*\) of 32 layers on the GPU.*/\1/p')
[ -n "$kept" ] && [ "$kept" -gt 0 ] && [ "$kept" -lt 32 ] || fail "model.weights auto on 5GiB kept no layers: $out"
keeps() {
    "$MEMTUNE" plan "${q7[@]}" --set model.weights=cpu --set "model.resident_layers=$1" --gpu-memory 5GiB --brief 2>&1 |
        grep -q "^peak .*: fits"
}
keeps "$kept" && ! keeps $((kept + 1)) || fail "model.weights auto on 5GiB: $kept resident layers is not the most"
out=$("$MEMTUNE" plan "${q7[@]}" --set model.weights=ssd --set offload.path="$W/weights" --gpu-memory 4GiB 2>&1)
echo "$out" | gq "^disk .* (the base's file under offload.path" || fail "model.weights ssd: no disk line: $out"
echo "$out" | gq "^peak .*: fits" || fail "model.weights ssd on 4GiB: $out"
# the optimizer state's file on the disk line: Llama-2-7B's 75.33 GiB with fp32 moments, 37.86 with int8 (6.03 bytes
# a parameter: master, two codes and an absmax per 256 of each moment, in records of whole blocks)
f7=(configs/full-offload-cpu.yaml --set model.path=configs/models/llama-2-7b --set offload.optimizer=ssd
    --set offload.path="$W/ssd7" --set train.device=gpu)
for moments in fp32:75.33 int8:37.86; do
    out=$("$MEMTUNE" plan "${f7[@]}" --set offload.moments="${moments%:*}" 2>&1)
    echo "$out" | gq "^disk  *${moments#*:} GiB (the optimizer state's file under offload.path)" ||
        fail "offload.moments ${moments%:*} on disk: $out"
done
echo "test_plan: the 7B optimizer state on disk: 75.33 GiB, 37.86 GiB with int8 moments"
# offload.path set for auto's ssd choice alone: no refusal where the run fits the GPU (the path goes unused) ...
out=$("$MEMTUNE" plan "${q7[@]}" --set model.weights=auto --set offload.path="$W/weights" --gpu-memory 24GiB --brief 2>&1)
echo "$out" | gq "^model.weights auto: gpu (the run fits" || fail "model.weights auto with offload.path: $out"
# ... and where no host holds the base (MeZO over 200 layers of hidden 16384, 1.3 TB of bf16) the file takes it,
# with the first layers that fit the GPU kept there
mkdir -p "$W/huge"
echo '{"architectures":["LlamaForCausalLM"],"vocab_size":32000,"hidden_size":16384,"intermediate_size":53248,
"num_hidden_layers":200,"num_attention_heads":128,"num_key_value_heads":8,"rms_norm_eps":1e-5,
"max_position_embeddings":4096,"rope_theta":10000.0,"tie_word_embeddings":false}' > "$W/huge/config.json"
out=$("$MEMTUNE" plan configs/mezo.yaml --set model.path="$W/huge" --set model.weights=auto --set train.micro_batch=1 \
    --set offload.path="$W/weights" --gpu-memory 80GiB --brief 2>&1)
echo "$out" | gq "^model.weights auto: ssd (.* keeping the first [0-9]* of 200 layers on the GPU" ||
    fail "model.weights auto for a base no host holds: $out"
echo "test_plan: model.weights auto (resident, streamed, $kept layers kept) and ssd for QLoRA 7B"

# model.deterministic_attention: without a GPU to ask, the forecast counts memtune's own kernel (deterministic,
# linear in T), so auto stays deterministic and says nothing; false forecasts the same; a bad value names the choices
out=$("$MEMTUNE" plan "${q7[@]}" --set train.seq_len=32768 --gpu-memory 16GiB 2>&1) || fail "plan at T=32768: $out"
echo "$out" | gq "deterministic_attention auto" && fail "deterministic_attention auto chose without a GPU: $out"
p_auto=$(echo "$out" | awk '/^peak/{print $2, $3; exit}')
p_false=$("$MEMTUNE" plan "${q7[@]}" --set train.seq_len=32768 --set model.deterministic_attention=false \
    --gpu-memory 16GiB 2>&1 | awk '/^peak/{print $2, $3; exit}')
[ -n "$p_auto" ] && [ "$p_auto" = "$p_false" ] || fail "deterministic_attention false changed the own kernel's forecast"
out=$("$MEMTUNE" plan "${q7[@]}" --set model.deterministic_attention=sometimes 2>&1)
[ $? -eq 1 ] && echo "$out" | gq "expected one of auto|true|false" ||
    fail "model.deterministic_attention=sometimes: expected a refusal naming the choices: $out"
echo "test_plan: model.deterministic_attention without a GPU ($p_auto either way)"

# train.seq_len: max with the layer inputs offloaded where host memory binds (--host-memory 16GiB, of which 85%
# may be planned, beside a 40 GiB GPU; Llama-3.1-8B QLoRA): it keeps the fewest of the first layer inputs on the
# GPU that let a longer length fit both. The chosen length and count fit both; one fewer does not fit the host;
# one token more fits with neither that count nor one more. With the count fixed by the user, host memory binds
# and the line says so.
l8=(configs/llama-qlora.yaml --set model.path=configs/models/llama-3.1-8b --set train.micro_batch=1
    --set model.activation_checkpointing=true --set model.offload_activations=true --host-memory 16GiB)
out=$("$MEMTUNE" plan "${l8[@]}" --set train.seq_len=max --gpu-memory 40GiB 2>&1) ||
    fail "train.seq_len max, host-bound: memtune plan failed: $out"
T=$(echo "$out" | sed -n 's/^train.seq_len max: \([0-9]*\) tokens.*(model.gpu_layer_inputs: \([0-9]*\)).*/\1/p')
K=$(echo "$out" | sed -n 's/^train.seq_len max: \([0-9]*\) tokens.*(model.gpu_layer_inputs: \([0-9]*\)).*/\2/p')
plain=$(echo "$out" | sed -n 's/^longest train.seq_len that fits as configured: //p')
[ -n "$T" ] && [ "$K" -gt 0 ] && [ "$T" -gt "$plain" ] ||
    fail "train.seq_len max, host-bound: expected layer inputs kept on the GPU and a length above $plain: $out"
both() {  # T K: 0 when the forecast fits the 40 GiB GPU and 85% of the 16 GiB host (plan's words)
    local f
    f=$("$MEMTUNE" plan "${l8[@]}" --set model.mlp_tile_rows=2048 --set "train.seq_len=$1" \
        --set "model.gpu_layer_inputs=$2" --gpu-memory 40GiB --brief 2>&1)
    echo "$f" | gq "^peak .*: fits$" && echo "$f" | gq "^(host memory: .* (--host-memory): fits)$"
}
both "$T" "$K" || fail "train.seq_len max, host-bound: T=$T with $K kept does not fit"
! both "$T" $((K - 1)) || fail "train.seq_len max, host-bound: T=$T fits with $((K - 1)) kept, fewer than $K"
! both $((T + 1)) "$K" && ! both $((T + 1)) $((K + 1)) || fail "train.seq_len max, host-bound: T=$((T + 1)) fits"
out=$("$MEMTUNE" plan "${l8[@]}" --set train.seq_len=max --set model.gpu_layer_inputs=1 --gpu-memory 40GiB 2>&1)
echo "$out" | gq "^train.seq_len max: [0-9]* tokens.*; host memory binds it" ||
    fail "train.seq_len max with model.gpu_layer_inputs 1 on a 16 GiB host: expected the host to bind: $out"
echo "test_plan: train.seq_len max, 8B QLoRA on 40GiB beside 16GiB of host: T=$T with $K layer inputs kept ($plain without)"
# the last 8 layer inputs in a file under offload.path: the host holds fewer, a longer length fits, the disk line
# gives the file's size (8 inputs of T tokens x 4096 x 2 bytes)
out=$("$MEMTUNE" plan "${l8[@]}" --set train.seq_len=max --gpu-memory 40GiB --set model.ssd_layer_inputs=8 \
    --set "offload.path=$W/inputs" 2>&1) || fail "train.seq_len max, 8 layer inputs in a file: memtune plan failed: $out"
T8=$(echo "$out" | sed -n 's/^train.seq_len max: \([0-9]*\) tokens.*/\1/p')
[ -n "$T8" ] && [ "$T8" -gt "$T" ] || fail "train.seq_len max, 8 layer inputs in a file: expected more than $T: $out"
disk=$(echo "$out" | awk '/^disk /{print $2, $3; exit}')
want=$(awk -v t="$T8" 'BEGIN { printf "%.2f GiB", 8 * t * 4096 * 2 / 1073741824 }')
[ "$disk" = "$want" ] || fail "train.seq_len max, 8 layer inputs in a file: disk line '$disk', expected '$want': $out"
echo "$out" | gq "^(disk: .* free at $W/inputs: \(fits\|does NOT fit\)" ||
    fail "train.seq_len max, 8 layer inputs in a file: no line on the disk's free space: $out"
echo "test_plan: the same with the last 8 layer inputs in a file: T=$T8, $disk on disk"
# with offload.path and no count, train.seq_len: max puts the fewest last inputs in the file that the host then
# fits (none on the GPU): a length above the kept-only one, and one fewer in the file does not fit the host
out=$("$MEMTUNE" plan "${l8[@]}" --set train.seq_len=max --gpu-memory 40GiB --set "offload.path=$W/inputs" 2>&1) ||
    fail "train.seq_len max with offload.path: memtune plan failed: $out"
TF=$(echo "$out" | sed -n 's/^train.seq_len max: \([0-9]*\) tokens.*(model.ssd_layer_inputs: \([0-9]*\)).*/\1/p')
KF=$(echo "$out" | sed -n 's/^train.seq_len max: \([0-9]*\) tokens.*(model.ssd_layer_inputs: \([0-9]*\)).*/\2/p')
[ -n "$TF" ] && [ "$KF" -gt 0 ] && [ "$TF" -gt "$T" ] ||
    fail "train.seq_len max with offload.path: expected inputs in the file and a length above $T: $out"
filed() {  # T K: 0 when the forecast with the last K inputs in the file fits the host (plan's words)
    "$MEMTUNE" plan "${l8[@]}" --set model.mlp_tile_rows=2048 --set "train.seq_len=$1" --set "model.ssd_layer_inputs=$2" \
        --set "offload.path=$W/inputs" --gpu-memory 40GiB --brief 2>&1 | gq "^(host memory: .* (--host-memory): fits)$"
}
filed "$TF" "$KF" || fail "train.seq_len max with offload.path: T=$TF with $KF in the file does not fit the host"
! filed "$TF" $((KF - 1)) || fail "train.seq_len max with offload.path: T=$TF fits with $((KF - 1)) in the file"
echo "test_plan: the same with offload.path: T=$TF with the last $KF layer inputs in a file"

# the 7B configs, forecast for the GPU from config.json alone
for c in llama-lora llama-qlora mezo galore full-offload-cpu full-offload-ssd long-context; do
    out=$("$MEMTUNE" plan "configs/$c.yaml" --set model.path=configs/models/llama-2-7b --gpu-memory 80GiB 2>&1) ||
        fail "$c: memtune plan failed: $out"
    peak=$(echo "$out" | awk '/^peak/{print $2, $3; exit}')
    echo "$out" | gq "^longest train.seq_len that fits as configured: [0-9]" ||
        fail "$c: no longest seq_len in: $out"
    # the MLP in tiles: a longer context fits where the configured one is
    # bound by the MLP's buffers (reported only when longer)
    longest=$(echo "$out" | sed -n 's/^longest train.seq_len that fits as configured: //p')
    tiled=$(echo "$out" | sed -n 's/^with the MLP in tiles of 2048 tokens (model.mlp_tile_rows: 2048).*: \([0-9]*\)$/\1/p')
    [ -z "$tiled" ] || [ "$tiled" -gt "$longest" ] || fail "$c: tiled $tiled not above $longest"
    [ "$c" != llama-qlora ] || [ -n "$tiled" ] || fail "$c: no tiled length in: $out"
    # whose attention workspace: cuDNN's where a GPU is visible, else memtune's kernel's, said either way
    echo "$out" | gq "^(attention's workspace: " || fail "$c: no line on attention's workspace in: $out"
    echo "test_plan: configs/$c.yaml at Llama-2-7B's shape on a GPU: peak $peak"
    # --brief: the same forecast, without the alternatives or the longest length
    brief=$("$MEMTUNE" plan "configs/$c.yaml" --set model.path=configs/models/llama-2-7b --gpu-memory 80GiB \
        --brief 2>&1) || fail "$c --brief: memtune plan failed: $brief"
    [ "$(echo "$brief" | awk '/^peak/{print $2, $3; exit}')" = "$peak" ] || fail "$c --brief: another peak: $brief"
    echo "$brief" | gq "^alternative\|^longest" && fail "$c --brief: more than the forecast: $brief"
done
# a combination the trainer refuses: the same message, exit 1
out=$("$MEMTUNE" plan "${base[@]}" --set optim.kind=mezo --set dist.zero_stage=1 2>&1)
rc=$?
[ $rc -eq 1 ] && echo "$out" | gq "dist.zero_stage 1 shards the optimizer's state" ||
    fail "MeZO with ZeRO: expected the trainer's refusal and exit 1, got $rc: $out"
out=$("$MEMTUNE" plan "${base[@]}" --set model.gpu_layer_inputs=2 2>&1)
[ $? -eq 1 ] && echo "$out" | gq "model.gpu_layer_inputs is 2, but model.offload_activations is false" ||
    fail "model.gpu_layer_inputs without offloaded activations: expected a refusal: $out"
out=$("$MEMTUNE" plan "${base[@]}" --set model.ssd_layer_inputs=2 --set "offload.path=$W/inputs" 2>&1)
[ $? -eq 1 ] && echo "$out" | gq "model.ssd_layer_inputs is 2, but model.offload_activations is false" ||
    fail "model.ssd_layer_inputs without offloaded activations: expected a refusal: $out"
out=$("$MEMTUNE" plan "${base[@]}" --set model.activation_checkpointing=true --set model.offload_activations=true \
    --set model.ssd_layer_inputs=2 2>&1)
[ $? -eq 1 ] && echo "$out" | gq "model.ssd_layer_inputs needs offload.path" ||
    fail "model.ssd_layer_inputs without offload.path: expected a refusal: $out"
out=$("$MEMTUNE" plan "${base[@]}" --host-memory 64 2>&1)
[ $? -eq 2 ] && echo "$out" | gq "expected a size with its unit" || fail "--host-memory 64: $out"
out=$("$MEMTUNE" plan "${base[@]}" --gpu-memory lots 2>&1)
[ $? -eq 2 ] && echo "$out" | gq "expected a size" || fail "--gpu-memory lots: $out"
# a bare number is not taken as bytes (nothing would fit 80 bytes): refused, naming the unit
out=$("$MEMTUNE" plan "${base[@]}" --gpu-memory 80 2>&1)
[ $? -eq 2 ] && echo "$out" | gq "expected a size with its unit" || fail "--gpu-memory 80: $out"
out=$("$MEMTUNE" plan "${base[@]}" --gpu-memory 1073741824B 2>&1 | awk '/^peak/')
echo "$out" | gq "of 1.0 GiB (--gpu-memory)" || fail "--gpu-memory 1073741824B: $out"
out=$("$MEMTUNE" train "${base[@]}" --set memory.budget=16 --set "output.dir=$W/bare" 2>&1)
[ $? -ne 0 ] && echo "$out" | gq "memory.budget 16: expected a size with its unit" ||
    fail "memory.budget 16: expected a refusal naming the unit: $out"
[ ! -e "$W/bare/model" ] || fail "memory.budget 16: a refused run wrote a model"
# eval's and generate's --resident-layers: a count, and only for a streamed base
out=$("$MEMTUNE" generate --model configs/models/tiny --prompt hi --resident-layers 2 2>&1)
[ $? -eq 2 ] && echo "$out" | gq "it needs --weights cpu or ssd" ||
    fail "generate --resident-layers without --weights cpu: $out"
out=$("$MEMTUNE" eval --model configs/models/tiny --data "$W/none.h5" --weights cpu --resident-layers x 2>&1)
[ $? -eq 2 ] && echo "$out" | gq "resident-layers x: expected a whole number" ||
    fail "eval --resident-layers x: $out"
echo "test_plan: all passed"
