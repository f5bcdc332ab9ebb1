#!/usr/bin/env bash
# The GPU measurements docs/performance.md asks for, in one call on a lent GPU machine: IG per
# target-iteration (a batched round), per-sample gradients, LTI and text pairs per second, TAG
# per target-iteration, and the GPU's utilisation while each benchmark ran.
#
# The benchmarks need only torch, numpy and scipy besides fedleak's source tree, so the
# machine's own python3 (with CUDA torch) runs them from the repository root:
#
#     OUT=/some/folder bash benchmarks/gpu_session.sh          # at most 150 s per benchmark
#     DEVICE=cpu bash benchmarks/gpu_session.sh                # the same steps on a CPU
#
# Each benchmark writes OUT/<name>.log; OUT/utilisation.txt summarises nvidia-smi's samples
# per benchmark (absent without nvidia-smi).
set -uo pipefail
OUT=${OUT:-/tmp/fedleak-gpu}
DEVICE=${DEVICE:-cuda}
ROUNDS=${ROUNDS:-3}
PYTHON=${PYTHON:-python3}
LIMIT=${LIMIT:-150}  # seconds per benchmark
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: > "$OUT/marks.txt"

sampler=""
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
        -lms 200 > "$OUT/util.csv" &
    sampler=$!
fi
# Ended from outside (a session's time limit): stop the sampler and the benchmark running, or
# nvidia-smi samples on, orphaned, for good. Each benchmark runs as a background job that the
# script waits for, since bash runs a trap only once a foreground command has ended.
job=""
stop() {
    [ -z "$sampler" ] || kill "$sampler" 2> /dev/null
    if [ -n "$job" ]; then
        pkill -TERM -P "$job" 2> /dev/null
        kill "$job" 2> /dev/null
    fi
    echo "== stopped ($(date -u +%T))"
    exit 130
}
trap stop INT TERM

status=0
bench() {
    local name=$1
    shift
    echo "== $name ($(date -u +%T))"
    echo "$name start $(date -u +%s.%N)" >> "$OUT/marks.txt"
    (timeout "$LIMIT" "$PYTHON" "$@" 2>&1 | tee "$OUT/$name.log"; exit "${PIPESTATUS[0]}") &
    job=$!
    wait "$job"
    local code=$?
    job=""
    echo "$name end $(date -u +%s.%N)" >> "$OUT/marks.txt"
    [ "$code" -eq 0 ] || { echo "== $name exited $code"; status=1; }
}

bench attacks benchmarks/bench_attacks.py --devices "$DEVICE" --rounds "$ROUNDS" \
    --models lenet resnet20-gn
bench per_sample benchmarks/bench_per_sample.py --devices "$DEVICE" --rounds "$ROUNDS"
bench lti benchmarks/bench_lti.py --device "$DEVICE" --rounds "$ROUNDS"
bench text benchmarks/bench_text.py --device "$DEVICE" --rounds "$ROUNDS"

if [ -n "$sampler" ]; then
    kill "$sampler"
    "$PYTHON" benchmarks/gpu_utilisation.py "$OUT/util.csv" "$OUT/marks.txt" \
        | tee "$OUT/utilisation.txt"
fi
exit $status
