#!/usr/bin/env bash
# Issue 21's two benchmarks (inheritance_speedup.py, multistage_budget.py) in one call on a lent GPU machine:
# 8 shards side by side, each 2 CPU threads, all on the one GPU. Only the shards' JSON result files come back
# (copied into OUT/<shard>/ every 20 s, so a call cut short loses at most that); merge them where the runs'
# teacher lives (runs/<benchmark>/teacher, carried from here) and render:
#
#   bash benchmarks/claims_gpu.sh OUT MINUTES [DEVICE [ARGS...]]    # on the GPU machine: OUT 7 cuda
#   python benchmarks/multistage_budget.py --rules cofi --merge OUT/ms-*            # here, afterwards:
#   python benchmarks/inheritance_speedup.py --merge OUT/speedup-*                  # unfinished runs go on here
#
# MINUTES: each shard stops (resumably) at its first evaluation point after this; it is killed 60 s later.
# Multi-stage: both rule sets for the learned masks (the pilot's question, answered with 2 seeds), manual once.
set -uo pipefail
OUT=${1:?OUT}
MIN=${2:?MINUTES}
DEV=${3:-cuda}
EXTRA=("${@:4}") # passed to every shard (a CPU smoke run: cpu --tiny --work DIR)
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
NAMES=()

shard() { # NAME SCRIPT ARGS...
    local name=$1 script=$2
    shift 2
    NAMES+=("$name")
    timeout "$(awk "BEGIN {print int($MIN * 60 + 60)}")" "$PY" "benchmarks/$script" "$@" --device "$DEV" \
        --minutes "$MIN" --out "$WORK/$name" "${EXTRA[@]}" >"$WORK/$name.log" 2>&1 &
}

copy_back() {
    local name
    for name in "${NAMES[@]}"; do
        for f in "$WORK/$name"/*.json; do
            [[ -f "$f" ]] && mkdir -p "$OUT/$name" && cp "$f" "$OUT/$name/.tmp" && mv "$OUT/$name/.tmp" "$OUT/$name/$(basename "$f")"
        done
    done
}

for i in 0 1 2 3; do shard "ms-cofi-$i" multistage_budget.py --rules cofi --shard "$i/4"; done
for i in 0 1; do shard "ms-tinyclip-$i" multistage_budget.py --rules tinyclip --methods learned --shard "$i/2"; done
for i in 0 1; do shard "speedup-$i" inheritance_speedup.py --shard "$i/2"; done
while [[ -n "$(jobs -r)" ]]; do
    sleep 20
    copy_back
done
wait
copy_back
for name in "${NAMES[@]}"; do
    echo "== $name: $(grep -ac 'paused during' "$WORK/$name.log") paused"
    grep -a "Error\|error" "$WORK/$name.log" | tail -n 3
done
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null || true
