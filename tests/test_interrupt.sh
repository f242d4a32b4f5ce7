#!/usr/bin/env bash
# tests/test_interrupt.sh MEMTUNE REPO: a run stopped by SIGINT exits 0 with a
# checkpoint and a resume hint; kill -9 at random moments never breaks the
# newest checkpoint; the run, interrupted and resumed over and over, ends with
# exactly the losses of an uninterrupted one (CPU backend); and so with AdamW's
# state offloaded (checkpoints from a snapshot of the store).
set -u
MEMTUNE=$1
ROOT=$2
W=$(mktemp -d /tmp/memtune-interrupt-XXXXXX)
trap 'rm -rf "$W"' EXIT
fail() { echo "test_interrupt: FAIL: $*"; for f in "$W"/*.log; do echo "--- $f"; tail -5 "$f"; done; exit 1; }

cat "$ROOT"/README.md "$ROOT"/docs/*.md > "$W/text.txt"
"$MEMTUNE" tokenize --input "$W/text.txt" --output "$W/data.h5" > /dev/null || fail "tokenize"
common=(train "$ROOT/configs/quickstart.yaml" --set "data.train=$W/data.h5" --set "model.path=$ROOT/configs/models/tiny"
        --set train.device=cpu --set train.seq_len=32 --set train.micro_batch=2 --set train.steps=120
        --set train.log_every=1 --set data.eval_fraction=0.05 --set train.eval_every=0 --set checkpoint.every=1
        --set checkpoint.keep=2)

"$MEMTUNE" "${common[@]}" --set "output.dir=$W/ref" > "$W/ref.log" 2>&1 || fail "uninterrupted run"

# SIGINT: finish the step, checkpoint, exit 0
"$MEMTUNE" "${common[@]}" --set "output.dir=$W/run" > "$W/sigint.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
    [ -f "$W/run/metrics.jsonl" ] && [ "$(wc -l < "$W/run/metrics.jsonl")" -ge 3 ] && break
    sleep 0.05
done
kill -INT "$pid"
wait "$pid"
rc=$?
[ "$rc" -eq 0 ] || fail "SIGINT: exit status $rc, expected 0"
grep -q "train.resume=auto" "$W/sigint.log" || fail "SIGINT: no resume hint"
ls -d "$W"/run/checkpoints/step-* > /dev/null 2>&1 || fail "SIGINT: no checkpoint"

# a second signal exits at once (status 128+2), or the first one already finished (0)
"$MEMTUNE" "${common[@]}" --set "output.dir=$W/run" --set train.resume=auto > "$W/twice.log" 2>&1 &
pid=$!
sleep 0.3
kill -INT "$pid"; sleep 0.01; kill -INT "$pid"
wait "$pid"
rc=$?
[ "$rc" -eq 130 ] || [ "$rc" -eq 0 ] || fail "two SIGINTs: exit status $rc, expected 130 (or 0)"
echo "test_interrupt: two SIGINTs: exit status $rc"

# kill -9 at random moments, resuming each time, then finish: the losses of
# the uninterrupted run REF (NAME: the run's folder; then the run's settings)
kills() {
    local name=$1 ref=$2 n=$3 i pid resumed
    shift 3
    for i in $(seq "$n"); do
        "$MEMTUNE" "${common[@]}" "$@" --set "output.dir=$W/$name" --set train.resume=auto > "$W/$name-kill$i.log" 2>&1 &
        pid=$!
        sleep "0.$(( (RANDOM % 4) + 1 ))$(( RANDOM % 10 ))"
        kill -9 "$pid" 2> /dev/null
        wait "$pid" 2> /dev/null
    done
    resumed=$(grep -ho "at step [0-9]*" "$W/$name"-kill*.log | sort -u | tr '\n' ' ')
    echo "test_interrupt: $name: the killed runs resumed from: ${resumed:-none}"
    # finish (unless a resumed run already got to the end)
    if ! "$MEMTUNE" "${common[@]}" "$@" --set "output.dir=$W/$name" --set train.resume=auto > "$W/$name-final.log" 2>&1; then
        grep -q "nothing left to train" "$W/$name-final.log" || fail "$name: final resume"
    fi
    diff <(grep -o '"loss":[^,]*' "$W/$ref/metrics.jsonl") <(grep -o '"loss":[^,]*' "$W/$name/metrics.jsonl") \
        > "$W/diff.txt" || fail "$name: losses differ from the uninterrupted run: $(head -4 "$W/diff.txt")"
    [ "$(grep -c '"loss"' "$W/$name/metrics.jsonl")" -eq 120 ] || fail "$name: metrics.jsonl does not have 120 records"
}

kills run ref 6
echo "test_interrupt: passed (SIGINT, 6 kills at random moments, 120 losses identical to the uninterrupted run)"

# the same with AdamW's state offloaded to host memory: each checkpoint is
# written in the background from a snapshot of the store
off=(--set offload.optimizer=cpu)
"$MEMTUNE" "${common[@]}" "${off[@]}" --set "output.dir=$W/oref" > "$W/oref.log" 2>&1 || fail "uninterrupted offloaded run"
grep -q "copied from the offload store" "$W/oref.log" || fail "offloaded: checkpoints not written from a snapshot of the store"
kills orun oref 4 "${off[@]}"
echo "test_interrupt: offloaded: passed (4 kills at random moments, 120 losses identical to the uninterrupted run)"
