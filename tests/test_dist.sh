#!/usr/bin/env bash
# tests/test_dist.sh MEMTUNE REPO: data parallelism, 2 ranks. Each run's
# losses must equal, to rounding, a single process's with twice the
# accumulation (or, for GaLore, which takes no accumulation, twice the
# micro-batch: the same windows): AdamW with ZeRO stages 0, 1 and 2, LoRA,
# QLoRA, MeZO, GaLore, offloaded AdamW (also with ZeRO: each rank offloads its
# shard; GaLore's unprojected parameters too).
# A 2-rank run stopped and resumed gives the uninterrupted one's losses bit
# for bit; ranks with different configs are refused; a rank killed mid-run
# ends the job instead of leaving the other hanging.
#
# MT_DIST_DEVICE picks where (cpu by default, in CI):
#   cpu         the CPU backend under mpirun: MPI's collectives
#   gpu         GPUs 0 and 1, a rank each (MT_RANK/MT_RENDEZVOUS): NCCL
#   gpu-shared  both ranks on GPU 0, NCCL over its socket transport on the
#               loopback (each rank its own NCCL_HOSTID, or NCCL refuses two
#               ranks on one GPU): slow, but the NCCL code path, on a
#               machine with one GPU
# MT_DIST_LOGS, a folder: the runs' logs are copied there at the end.
# MT_DIST_ONLY, a regular expression: only the pairs and checks whose names
# match run (pairs by their names; checks: grad-memory, nan, resume-zero2,
# resume-galore, resume-offload, mismatch, killed). .ci/run's sanitizer pass
# runs a representative few; the plain build runs them all.
# MT_DIST_TOL is the relative tolerance of the loss comparisons: 1e-4 on the
# CPU (fp32); 4e-3 on a GPU, bf16's rounding (2^-8), as a gradient summed in
# another order may round a bf16 weight the other way (MeZO's: 0).
set -u
MEMTUNE=$1
ROOT=$2
PART=${3:-all}  # pairs, checks (ctest runs each as a test of its own) or all
DEV=${MT_DIST_DEVICE:-cpu}
TOL=${MT_DIST_TOL:-$([ "$DEV" = cpu ] && echo 1e-4 || echo 4e-3)}
W=$(mktemp -d /tmp/memtune-dist-XXXXXX)
trap '[ -n "${MT_DIST_LOGS:-}" ] && mkdir -p "$MT_DIST_LOGS" && cp "$W"/*.log "$MT_DIST_LOGS"/; rm -rf "$W"' EXIT
fail() { echo "test_dist: FAIL: $*"; for f in "$W"/*.log; do echo "--- $f"; tail -5 "$f"; done; exit 1; }

case $DEV in
    cpu)
        command -v mpirun > /dev/null || fail "no mpirun (scripts/install-deps.sh installs openmpi-bin)"
        # CI containers run as root; 2 ranks may exceed the cores
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
        LAUNCHER="mpi"
        ;;
    gpu | gpu-shared)
        LAUNCHER="env"
        export NCCL_NVLS_ENABLE=0
        [ "$DEV" = gpu-shared ] && export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_NET=Socket \
            NCCL_SOCKET_IFNAME=lo
        ;;
    *) fail "MT_DIST_DEVICE=$DEV: use cpu, gpu or gpu-shared" ;;
esac
echo "test_dist: 2 ranks on $DEV (launcher: $LAUNCHER), losses compared to $TOL relative"

# two COMMAND...: the command as 2 ranks, rank r with the options in
# ${EXTRA[r]} appended; fails if either rank does
EXTRA=("" "")
two() {
    # shellcheck disable=SC2086
    if [ "$LAUNCHER" = mpi ]; then
        mpirun --oversubscribe -np 1 "$@" ${EXTRA[0]} : -np 1 "$@" ${EXTRA[1]}
        return
    fi
    local rdv r rc=0 pids=()
    rdv=$(mktemp -d "$W/rendezvous-XXXXXX")
    for r in 0 1; do
        # shellcheck disable=SC2086
        if [ "$DEV" = gpu-shared ]; then
            MT_WORLD_SIZE=2 MT_RANK=$r MT_LOCAL_RANK=0 MT_LOCAL_WORLD_SIZE=1 MT_RENDEZVOUS=$rdv \
                NCCL_HOSTID=memtune-test-rank$r "$@" ${EXTRA[r]} &
        else
            MT_WORLD_SIZE=2 MT_RANK=$r MT_LOCAL_RANK=$r MT_LOCAL_WORLD_SIZE=2 MT_RENDEZVOUS=$rdv "$@" ${EXTRA[r]} &
        fi
        pids+=($!)
    done
    for r in "${pids[@]}"; do wait "$r" || rc=1; done
    return $rc
}

cat "$ROOT"/README.md "$ROOT"/docs/*.md > "$W/text.txt"
"$MEMTUNE" tokenize --input "$W/text.txt" --output "$W/data.h5" > /dev/null || fail "tokenize"
common=(train "$ROOT/configs/quickstart.yaml" --set "data.train=$W/data.h5" --set "model.path=$ROOT/configs/models/tiny"
        --set train.device="${DEV%-shared}" --set train.seq_len=32 --set train.micro_batch=2 --set train.steps=16
        --set train.log_every=1 --set train.eval_every=0 --set checkpoint.every=0)

losses() { grep -o '"loss":[^,]*' "$1/metrics.jsonl" | cut -d: -f2; }
# same NAME A B: the two runs' losses agree to 1e-4 relative, and there are 16
same() {
    local n max want=${4:-16}
    read -r n max < <(paste <(losses "$2") <(losses "$3") |
        awk '{d = $1 - $2; if (d < 0) d = -d; if (d > tol * ($1 < 0 ? -$1 : $1)) bad++; if (d > max) max = d; n++}
             END {print (bad ? -1 : n + 0), max + 0}' tol="$TOL")
    [ "$n" -ge "$want" ] && [ "$(losses "$2" | wc -l)" -eq "$(losses "$3" | wc -l)" ] ||
        fail "$1: losses differ (or are missing): $(paste <(losses "$2") <(losses "$3") | head -16 | tr '\n' ' ')"
    echo "test_dist: $1: the $n losses agree to $TOL relative (largest absolute difference $max)"
}

wanted() { [ -z "${MT_DIST_ONLY:-}" ] || [[ $1 =~ $MT_DIST_ONLY ]]; }

# NAME "single-process options" "2-rank options" [LEAST]: at least LEAST
# losses (16) agree (inside a check, whichever pairs it needs)
SECTION=""
pair() {
    local name=$1 one=$2 two=$3 least=${4:-16}
    [ -n "$SECTION" ] || wanted "$name" || return 0
    # shellcheck disable=SC2086
    "$MEMTUNE" "${common[@]}" $one --set "output.dir=$W/$name-1" > "$W/$name-1.log" 2>&1 || fail "$name: one process"
    # shellcheck disable=SC2086
    two "$MEMTUNE" "${common[@]}" $two --set "output.dir=$W/$name-2" > "$W/$name-2.log" 2>&1 ||
        fail "$name: 2 ranks"
    same "$name" "$W/$name-1" "$W/$name-2" "$least"
}

if [ "$PART" != checks ]; then
    pair adamw "--set train.grad_accum=2" ""
    # prompt/completion rows with very unequal trained counts: the loss is the
    # mean over the step's trained tokens across micro-batches and ranks
    if wanted masked; then
        awk 'BEGIN { for (i = 1; i <= 600; i++) { a = ""; for (k = 0; k < (i * 7) % 29; k++) a = a substr("ab", k % 2 + 1, 1);
                     printf "{\"prompt\": \"Question %d, asked at length:\", \"completion\": \" %s.\"}\n", i, a } }' \
            > "$W/masked.jsonl"
        "$MEMTUNE" tokenize --input "$W/masked.jsonl" --output "$W/masked.h5" --format prompt-completion \
            --seq-len 32 --quiet > /dev/null || fail "tokenize the prompt/completion rows"
        pair masked "--set train.grad_accum=2 --set data.train=$W/masked.h5" "--set data.train=$W/masked.h5"
    fi
    pair zero1 "--set train.grad_accum=2" "--set dist.zero_stage=1"
    pair zero2 "--set train.grad_accum=4" "--set dist.zero_stage=2 --set train.grad_accum=2"
    pair lora "--set train.grad_accum=2 --set lora.r=4 --set lora.dropout=0" "--set lora.r=4 --set lora.dropout=0"
    pair lora-zero2 "--set train.grad_accum=2 --set lora.r=4 --set lora.dropout=0" \
        "--set lora.r=4 --set lora.dropout=0 --set dist.zero_stage=2"
    # QLoRA: the NF4 base is the same on every rank, the adapters as LoRA's
    q=(--set lora.r=4 --set lora.dropout=0 --set model.quantize=nf4)
    pair qlora-zero2 "--set train.grad_accum=2 ${q[*]}" "${q[*]} --set dist.zero_stage=2"
    ! wanted qlora-zero2 || grep -q "base weights frozen in NF4" "$W/qlora-zero2-2.log" ||
        fail "qlora-zero2: the base was not quantized"
    # MeZO's losses (no gradients, sums of per-token losses in double) are
    # the same bit for bit, on the GPU too: its difference of two losses over
    # a small eps would magnify any rounding
    TOL=0 pair mezo "--set train.grad_accum=2 --set optim.kind=mezo --set optim.lr=1e-3" \
        "--set optim.kind=mezo --set optim.lr=1e-3"
    pair galore "--set train.micro_batch=4 --set optim.kind=galore --set optim.grad_clip=0 --set galore.rank=4" \
        "--set optim.kind=galore --set optim.grad_clip=0 --set galore.rank=4"
    # GaLore with ZeRO: each rank keeps and updates the state of its own
    # parameters (stage 2 as 1: no gradient shards, GaLore's hook takes each
    # gradient to its owner)
    pair galore-zero2 "--set train.micro_batch=4 --set optim.kind=galore --set optim.grad_clip=0 --set galore.rank=4" \
        "--set dist.zero_stage=2 --set optim.kind=galore --set optim.grad_clip=0 --set galore.rank=4"
    # each rank keeps about half of GaLore's state
    if wanted galore && wanted galore-zero2; then
        opt_mib() { sed -n 's/^memory ([A-Za-z]*): .*optimizer \([0-9.]*\) MiB.*/\1/p' "$1"; }
        o1=$(opt_mib "$W/galore-2.log") o2=$(opt_mib "$W/galore-zero2-2.log")
        awk -v a="$o1" -v b="$o2" 'BEGIN {exit !(a > 0 && b > 0 && b < 0.7 * a)}' ||
            fail "GaLore's state per rank: $o2 MiB with ZeRO, $o1 MiB without"
        echo "test_dist: GaLore's state per rank: $o2 MiB with ZeRO-2, $o1 MiB without"
    fi
    pair offload "--set train.grad_accum=2 --set offload.optimizer=cpu" "--set offload.optimizer=cpu"
    # ZeRO with offload: each rank offloads its shard (a file per rank on ssd)
    pair zero2-offload "--set train.grad_accum=2 --set offload.optimizer=cpu" \
        "--set dist.zero_stage=2 --set offload.optimizer=cpu"
    # (its shard's sums on the device, handed over after backward; the host sums them in nan-offload-accum)
    pair zero2-offload-accum "--set train.grad_accum=4 --set offload.optimizer=cpu" \
        "--set dist.zero_stage=2 --set train.grad_accum=2 --set offload.optimizer=cpu --set offload.grad_sum=gpu"
    pair zero1-offload-ssd "--set train.grad_accum=2 --set offload.optimizer=ssd --set offload.path=$W/ssd-1" \
        "--set dist.zero_stage=1 --set offload.optimizer=ssd --set offload.path=$W/ssd-2"
    ! wanted zero2 || grep -q "data parallel: 2 ranks ($LAUNCHER)" "$W/zero2-2.log" ||
        fail "no data-parallel line in the log"
    ! wanted adamw || [ "$(grep -c '^done:' "$W/adamw-2.log")" -eq 1 ] || fail "more than one rank reported the run"
    # ZeRO-2 hands each reduced part to the store as it arrives (or with
    # offload.grad_sum gpu its shard's sums after backward)
    ! wanted zero2-offload || grep -q "gradients streamed per layer" "$W/zero2-offload-2.log" ||
        fail "ZeRO-2 + offload did not stream"
    ! wanted zero2-offload-accum ||
        grep -q "gradients summed over the micro-batches where computed" "$W/zero2-offload-accum-2.log" ||
        fail "ZeRO-2 + offload + accumulation with offload.grad_sum gpu streamed"
    # ZeRO-2's streamed gradients in one process (its code path, with a copy for the reduce)
    if wanted adamw; then
        "$MEMTUNE" "${common[@]}" --set train.grad_accum=2 --set dist.zero_stage=2 --set "output.dir=$W/zero2-single" \
            > "$W/zero2-single.log" 2>&1 || fail "zero2 in one process"
        same "zero2 in one process vs AdamW" "$W/adamw-1" "$W/zero2-single"
    fi
    # GaLore with ZeRO and offload: each rank's store holds the unprojected ones
    # of its own parameters; stopped and resumed (the 2 ranks' run above is the
    # whole one) the losses and model are the same bit for bit
    if wanted galore-zero1-offload; then
        gzo=(--set optim.kind=galore --set optim.grad_clip=0 --set galore.rank=4 --set galore.update_gap=5
             --set offload.optimizer=cpu)
        pair galore-zero1-offload "--set train.micro_batch=4 ${gzo[*]}" "--set dist.zero_stage=1 ${gzo[*]}"
        grep -q "offloaded to host memory: .*GaLore does not project, of this rank's" "$W/galore-zero1-offload-2.log" ||
            fail "GaLore + ZeRO-1 + offload: no line for each rank's offloaded part"
        gzo+=(--set dist.zero_stage=1 --set checkpoint.every=4)
        two "$MEMTUNE" "${common[@]}" "${gzo[@]}" --set "output.dir=$W/gzo-split" --set train.stop_after=7 \
            > "$W/gzo-split.log" 2>&1 || fail "gzo-split"
        cp -r "$W/gzo-split" "$W/gzo-split-one"
        two "$MEMTUNE" "${common[@]}" "${gzo[@]}" --set "output.dir=$W/gzo-split" --set train.resume=auto \
            > "$W/gzo-resumed.log" 2>&1 || fail "gzo-resumed"
        cmp -s <(losses "$W/galore-zero1-offload-2") <(losses "$W/gzo-split") ||
            fail "GaLore + ZeRO-1 + offload resume: losses differ"
        cmp -s "$W/galore-zero1-offload-2/model/model.safetensors" "$W/gzo-split/model/model.safetensors" ||
            fail "GaLore + ZeRO-1 + offload resume: models differ"
        # one process finds each rank's offloaded moments in its shard file
        "$MEMTUNE" "${common[@]}" "${gzo[@]}" --set dist.zero_stage=0 --set "output.dir=$W/gzo-split-one" \
            --set train.resume=auto > "$W/gzo-split-one.log" 2>&1 || fail "one process resuming gzo-split"
        grep -q "resuming from .*step-00000007" "$W/gzo-split-one.log" || fail "one process did not resume gzo-split"
        echo "test_dist: GaLore with ZeRO-1 and offload, stopped after 7 steps and resumed: losses and model identical;" \
            "one process resumes it"
    fi
fi

if [ "$PART" != pairs ]; then
    if wanted grad-memory; then
        # ZeRO-2 frees the gradient: each rank holds its shard's sums and two layers'
        # buffers, against stage 1's whole block (16 layers: about 0.56 of it); with
        # offload only the two layers' buffers, with accumulation too (ZeRO-1 with
        # offload runs 2 micro-batches a step: the host sums them)
        mkdir -p "$W/deep"
        sed 's/"num_hidden_layers": 4/"num_hidden_layers": 16/' "$ROOT/configs/models/tiny/config.json" > "$W/deep/config.json"
        grads_mib() { sed -n 's/^memory ([A-Za-z]*): .*grads \([0-9.]*\) MiB.*/\1/p' "$1"; }
        for z in 1 2 2-offload 1-offload; do
            two "$MEMTUNE" "${common[@]}" --set "model.path=$W/deep" --set dist.zero_stage="${z%-offload}" --set train.steps=12 \
                --set offload.optimizer="$(case $z in *-offload) echo cpu ;; *) echo none ;; esac)" \
                --set train.grad_accum="$(case $z in 1-offload) echo 2 ;; *) echo 1 ;; esac)" \
                --set "output.dir=$W/deep-$z" > "$W/deep-$z.log" 2>&1 || fail "16 layers, ZeRO-$z"
        done
        g1=$(grads_mib "$W/deep-1.log") g2=$(grads_mib "$W/deep-2.log") g3=$(grads_mib "$W/deep-2-offload.log")
        g4=$(grads_mib "$W/deep-1-offload.log")
        awk -v a="$g1" -v b="$g2" 'BEGIN {exit !(a > 0 && b > 0 && b < 0.65 * a)}' ||
            fail "ZeRO-2 holds $g2 MiB of gradients per rank, ZeRO-1 $g1 MiB: not freed"
        awk -v a="$g2" -v b="$g3" 'BEGIN {exit !(b > 0 && b < 0.5 * a)}' ||
            fail "ZeRO-2 with offload holds $g3 MiB of gradients per rank, without $g2 MiB: the shard's sums stayed"
        [ "$g4" = "$g3" ] ||
            fail "ZeRO-1 with offload and 2 micro-batches holds $g4 MiB of gradients per rank, ZeRO-2 with offload $g3 MiB"
        echo "test_dist: gradients per rank, 16 layers: ZeRO-1 $g1 MiB, ZeRO-2 $g2 MiB, ZeRO-1 (2 micro-batches) or 2 with" \
            "offload $g3 MiB"
    fi

    if wanted nan; then
        SECTION=nan
        # one rank's loss not finite where gradients are streamed: every rank skips
        # that backward together, as one process would skip the step (else the other
        # rank waits in a collective). The model has a NaN in the embedding of one
        # byte (0x01) that occurs once in a short text: its window's loss is NaN,
        # on one rank only, once in the 16 steps (an epoch is 18: the data order of
        # one process and of 2 ranks is the same within an epoch).
        nan_row() {  # MODEL_DIR TOKEN: a NaN in the first value of TOKEN's embedding row
            local st=$1/model.safetensors n hdr entry dtype start width
            n=$(od -An -tu8 -N8 "$st" | tr -d ' ')
            hdr=$(dd if="$st" bs=1 skip=8 count="$n" 2> /dev/null)
            entry=$(grep -o '"model.embed_tokens.weight":{[^}]*}' <<< "$hdr")
            dtype=$(sed 's/.*"dtype":"\([A-Z0-9]*\)".*/\1/' <<< "$entry")
            start=$(sed 's/.*"data_offsets":\[\([0-9]*\),.*/\1/' <<< "$entry")
            width=$(sed 's/.*"shape":\[[0-9]*,\([0-9]*\)\].*/\1/' <<< "$entry")
            [ "$dtype" = F32 ] && [ -n "$start" ] && [ -n "$width" ] || fail "nan_row: $st: no F32 embedding ($entry)"
            printf '\x00\x00\xc0\x7f' | dd of="$st" bs=1 seek=$((8 + n + start + $2 * width * 4)) conv=notrunc 2> /dev/null
        }
        { head -c 1200 "$W/text.txt"; printf '\x01'; head -c 2400 "$W/text.txt" | tail -c 1200; } > "$W/short.txt"
        "$MEMTUNE" tokenize --input "$W/short.txt" --output "$W/short.h5" > /dev/null || fail "tokenize the short text"
        # (too short for an eval batch of 1%: an error, not a crash; its early exit once freed unset memory)
        "$MEMTUNE" "${common[@]}" --set "data.train=$W/short.h5" --set "output.dir=$W/short" > "$W/short.log" 2>&1
        rc=$?
        [ $rc -eq 1 ] && grep -q "fewer than one batch" "$W/short.log" || fail "too little eval data: exit $rc"
        "$MEMTUNE" "${common[@]}" --set train.steps=1 --set optim.warmup_steps=0 --set "output.dir=$W/nanbase" \
            > "$W/nanbase.log" 2>&1 || fail "a model to put a NaN in"
        nan_row "$W/nanbase/model" 1
        common_all=("${common[@]}")
        common+=(--set "data.train=$W/short.h5" --set "model.path=$W/nanbase/model" --set model.init=pretrained
                 --set data.eval_fraction=0 --set train.on_nonfinite=skip --set dist.timeout=60)
        pair nan-zero2 "--set train.grad_accum=2" "--set dist.zero_stage=2" 15
        pair nan-zero2-offload "--set train.grad_accum=2 --set offload.optimizer=cpu" \
            "--set dist.zero_stage=2 --set offload.optimizer=cpu" 15
        pair nan-galore "--set train.micro_batch=4 --set optim.kind=galore --set optim.grad_clip=0 --set galore.rank=4" \
            "--set optim.kind=galore --set optim.grad_clip=0 --set galore.rank=4" 15
        # offload summing micro-batches on the host, without clipping (a bucket
        # updates as its last gradients land): a skipped micro-batch backward must
        # keep the step's later ones from reaching the store, in one process (where
        # the NaN is not in the last of the 4 micro-batches) and over 2 ranks. One
        # row a micro-batch keeps 4 windows a step, so the epoch still outlasts the run.
        acc=(--set train.micro_batch=1 --set optim.grad_clip=0)
        pair nan-offload-accum "${acc[*]} --set train.grad_accum=4" \
            "${acc[*]} --set dist.zero_stage=2 --set train.grad_accum=2 --set offload.optimizer=cpu" 15
        "$MEMTUNE" "${common[@]}" "${acc[@]}" --set train.grad_accum=4 --set offload.optimizer=cpu \
            --set "output.dir=$W/nan-offload-accum-1o" > "$W/nan-offload-accum-1o.log" 2>&1 || fail "nan-offload-accum-1o"
        same "nan-offload-accum: offloaded vs AdamW on the device" "$W/nan-offload-accum-1" "$W/nan-offload-accum-1o" 15
        grep -q "gradients streamed per layer and summed on the host" "$W/nan-offload-accum-2.log" ||
            fail "ZeRO-2 + offload + accumulation did not stream"
        skips() { grep -o "update skipped" "$1" | wc -l; }
        [ "$(skips "$W/nan-offload-accum-1o.log")" -eq 1 ] || fail "nan-offload-accum-1o: not one skipped step"
        for run in nan-zero2 nan-zero2-offload nan-galore nan-offload-accum; do
            s1=$(skips "$W/$run-1.log") s2=$(skips "$W/$run-2.log")
            # (each rank warns: the 2 ranks' log has the line twice)
            [ "$s1" -eq 1 ] && [ "$s2" -eq 2 ] || fail "$run: one process skipped $s1 steps; the 2 ranks warned $s2 times"
        done
        echo "test_dist: one rank's loss NaN (ZeRO-2, ZeRO-2 + offload, GaLore, offload with accumulation): both ranks skip" \
            "that step, as one process does"
        common=("${common_all[@]}")
        SECTION=""
    fi

    if wanted resume-zero2; then
        # stopped after 7 steps and resumed, ZeRO-2 (the shards gathered into the checkpoint)
        z2=(--set dist.zero_stage=2 --set checkpoint.every=4)
        two "$MEMTUNE" "${common[@]}" "${z2[@]}" --set "output.dir=$W/whole" > "$W/whole.log" 2>&1 || fail "whole"
        two "$MEMTUNE" "${common[@]}" "${z2[@]}" --set "output.dir=$W/split" --set train.stop_after=7 \
            > "$W/split.log" 2>&1 || fail "split"
        ck=$W/split/checkpoints/step-00000007
        for r in 0 1; do [ -s "$ck/state-rank-0000$r-of-00002.h5" ] || fail "no shard file of rank $r in $ck"; done
        [ -s "$ck/state.h5" ] && [ -s "$ck/model/model.safetensors" ] || fail "$ck is incomplete"
        [ -z "$(ls -A "$W/split/checkpoints" | grep '^\.')" ] || fail "a temporary checkpoint folder was left behind"
        cp -r "$W/split" "$W/split-one"
        two "$MEMTUNE" "${common[@]}" "${z2[@]}" --set "output.dir=$W/split" --set train.resume=auto \
            > "$W/resumed.log" 2>&1 || fail "resumed"
        cmp -s <(losses "$W/whole") <(losses "$W/split") || fail "resume: losses differ"
        cmp -s "$W/whole/model/model.safetensors" "$W/split/model/model.safetensors" || fail "resume: models differ"
        echo "test_dist: 2 ranks, ZeRO-2, stopped after 7 steps and resumed: 16 losses and the model identical"
        # the 2 ranks' sharded checkpoint resumed by one process (another world size: the data order differs)
        "$MEMTUNE" "${common[@]}" --set checkpoint.every=4 --set "output.dir=$W/split-one" --set train.resume=auto \
            > "$W/split-one.log" 2>&1 || fail "one process resuming the 2 ranks' sharded checkpoint"
        grep -q "resuming from .*step-00000007" "$W/split-one.log" && [ "$(losses "$W/split-one" | grep -vc nan)" -eq 16 ] ||
            fail "one process did not resume the sharded checkpoint"
        echo "test_dist: a sharded checkpoint (a shard file per rank, state.h5 last) resumes in one process too"
    fi

    if wanted resume-galore; then
        # GaLore with ZeRO: each rank's projectors and moments in its shard file;
        # resumed by 2 ranks exactly, and by one process (which finds every
        # parameter's state in one shard file or the other)
        gz=(--set dist.zero_stage=2 --set optim.kind=galore --set optim.grad_clip=0 --set galore.rank=4
            --set galore.update_gap=5 --set checkpoint.every=4)
        two "$MEMTUNE" "${common[@]}" "${gz[@]}" --set "output.dir=$W/gwhole" > "$W/gwhole.log" 2>&1 || fail "gwhole"
        two "$MEMTUNE" "${common[@]}" "${gz[@]}" --set "output.dir=$W/gsplit" --set train.stop_after=7 \
            > "$W/gsplit.log" 2>&1 || fail "gsplit"
        gck=$W/gsplit/checkpoints/step-00000007
        for r in 0 1; do [ -s "$gck/state-rank-0000$r-of-00002.h5" ] || fail "no GaLore shard file of rank $r in $gck"; done
        cp -r "$W/gsplit" "$W/gsplit-one"
        two "$MEMTUNE" "${common[@]}" "${gz[@]}" --set "output.dir=$W/gsplit" --set train.resume=auto \
            > "$W/gresumed.log" 2>&1 || fail "gresumed"
        cmp -s <(losses "$W/gwhole") <(losses "$W/gsplit") || fail "GaLore resume: losses differ"
        cmp -s "$W/gwhole/model/model.safetensors" "$W/gsplit/model/model.safetensors" || fail "GaLore resume: models differ"
        "$MEMTUNE" "${common[@]}" "${gz[@]}" --set dist.zero_stage=0 --set "output.dir=$W/gsplit-one" --set train.resume=auto \
            > "$W/gsplit-one.log" 2>&1 || fail "one process resuming the 2 ranks' GaLore checkpoint"
        grep -q "resuming from .*step-00000007" "$W/gsplit-one.log" || fail "one process did not resume the GaLore checkpoint"
        echo "test_dist: GaLore with ZeRO-2, stopped and resumed: losses and model identical; one process resumes it"
    fi

    if wanted resume-offload; then
        # the same with ZeRO-2 and each rank's shard offloaded to a file
        zo=(--set dist.zero_stage=2 --set checkpoint.every=4 --set offload.optimizer=ssd --set "offload.path=$W/ssd-z")
        two "$MEMTUNE" "${common[@]}" "${zo[@]}" --set "output.dir=$W/owhole" > "$W/owhole.log" 2>&1 || fail "owhole"
        two "$MEMTUNE" "${common[@]}" "${zo[@]}" --set "output.dir=$W/osplit" --set train.stop_after=7 \
            > "$W/osplit.log" 2>&1 || fail "osplit"
        two "$MEMTUNE" "${common[@]}" "${zo[@]}" --set "output.dir=$W/osplit" --set train.resume=auto \
            > "$W/oresumed.log" 2>&1 || fail "oresumed"
        cmp -s <(losses "$W/owhole") <(losses "$W/osplit") || fail "offload resume: losses differ"
        cmp -s "$W/owhole/model/model.safetensors" "$W/osplit/model/model.safetensors" || fail "offload resume: models differ"
        echo "test_dist: 2 ranks, ZeRO-2, each offloading its shard to a file, stopped and resumed: losses and model identical"
        # without ZeRO every rank holds the whole store; rank 0 writes the in-place checkpoint straight from its
        # store, and a resume reads it into every rank's store a unit at a time
        po=(--set checkpoint.every=4 --set checkpoint.async=false --set offload.optimizer=cpu)
        two "$MEMTUNE" "${common[@]}" "${po[@]}" --set "output.dir=$W/pwhole" > "$W/pwhole.log" 2>&1 || fail "pwhole"
        two "$MEMTUNE" "${common[@]}" "${po[@]}" --set "output.dir=$W/psplit" --set train.stop_after=7 \
            > "$W/psplit.log" 2>&1 || fail "psplit"
        two "$MEMTUNE" "${common[@]}" "${po[@]}" --set "output.dir=$W/psplit" --set train.resume=auto \
            > "$W/presumed.log" 2>&1 || fail "presumed"
        grep -q "step-00000007 (.*read straight from the offload store" "$W/psplit.log" ||
            fail "offload without ZeRO: the stop's checkpoint was not read from the store"
        cmp -s <(losses "$W/pwhole") <(losses "$W/psplit") || fail "offload resume without ZeRO: losses differ"
        cmp -s "$W/pwhole/model/model.safetensors" "$W/psplit/model/model.safetensors" ||
            fail "offload resume without ZeRO: models differ"
        echo "test_dist: 2 ranks, offloaded in every rank, checkpoints read straight from rank 0's store, stopped and resumed: losses and model identical"
        # in the background (checkpoint.async, the default): rank 0 writes a snapshot of its store while both
        # ranks train on (the others copy nothing); resumed from step 4's, the uninterrupted run's losses
        pb=(--set checkpoint.every=4 --set checkpoint.keep=5 --set offload.optimizer=cpu --set "output.dir=$W/pbg")
        two "$MEMTUNE" "${common[@]}" "${pb[@]}" > "$W/pbg.log" 2>&1 || fail "pbg"
        grep -q "step 4 copied from the offload store" "$W/pbg.log" ||
            fail "offload without ZeRO: the background checkpoint was not a snapshot of the store"
        [ "$(grep -c "copied from the offload store" "$W/pbg.log")" = 4 ] ||
            fail "offload without ZeRO: a rank other than 0 copied its store, or a checkpoint was not a snapshot"
        two "$MEMTUNE" "${common[@]}" "${pb[@]}" --set "train.resume=$W/pbg/checkpoints/step-00000004" \
            > "$W/pbg-resumed.log" 2>&1 || fail "pbg-resumed"
        cmp -s <(losses "$W/pwhole") <(losses "$W/pbg") || fail "offload without ZeRO, resumed from a background checkpoint: losses differ"
        echo "test_dist: 2 ranks, offloaded in every rank, background checkpoints from a snapshot of rank 0's store, resumed from one: losses identical"
    fi

    if wanted mismatch; then
        # ranks with different configs
        EXTRA=("--set optim.lr=1e-3" "--set optim.lr=2e-3")
        two "$MEMTUNE" "${common[@]}" --set "output.dir=$W/bad" > "$W/mismatch.log" 2>&1 && fail "ranks with different configs ran"
        EXTRA=("" "")
        grep -q "do not agree on the configuration" "$W/mismatch.log" || fail "no message for different configs"
        echo "test_dist: ranks with different configs are refused with a message"
    fi

    if wanted killed; then
        # a rank killed mid-run: the job ends well before its dist.timeout (mpirun
        # takes the other rank down; without it, NCCL's error or the watchdog does)
        two "$MEMTUNE" "${common[@]}" --set train.steps=100000 --set dist.timeout=20 --set "output.dir=$W/killed" \
            > "$W/killed.log" 2>&1 &
        job=$!
        for _ in $(seq 600); do
            [ -f "$W/killed/metrics.jsonl" ] && [ "$(wc -l < "$W/killed/metrics.jsonl")" -ge 3 ] && break
            sleep 0.05
        done
        victim=$(pgrep -f "output.dir=$W/killed" | while read -r p; do
            [ "$(ps -o comm= -p "$p")" = memtune ] && echo "$p"; done | tail -1)
        [ -n "$victim" ] || fail "no rank to kill"
        kill -9 "$victim"
        t0=$SECONDS
        for _ in $(seq 400); do kill -0 "$job" 2> /dev/null || break; sleep 0.1; done
        kill -0 "$job" 2> /dev/null && { pkill -9 -f "output.dir=$W/killed"; fail "the job still runs 40 s after a rank was killed"; }
        wait "$job" && fail "the job exited 0 after a rank was killed"
        [ "$LAUNCHER" = mpi ] || grep -q "another rank has died or hangs" "$W/killed.log" ||
            fail "the surviving rank gave no message"
        echo "test_dist: a rank killed mid-run ends the job in $((SECONDS - t0)) s"
    fi

fi
echo "test_dist: all passed"
