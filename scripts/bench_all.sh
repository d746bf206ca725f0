#!/usr/bin/env bash
# Regenerate every benchmark result committed under docs/benchmarks/ on the default model (about 3.5 hours on
# 2 cores; run it alone on the machine: `bench speed` times against an unpatched llama.cpp in the same run).
# The Qwen long-context results (docs/benchmarks/long/) have their own command in docs/benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE

.venv/bin/python -c 'import kvpress' 2>/dev/null || .venv/bin/python -m pip install --disable-pip-version-check '.[compare]'
bash scripts/build_baseline.sh >/dev/null   # the unpatched llama.cpp (incremental after the first time)

kvgguf=.venv/bin/kvgguf
"$kvgguf" bench speed
"$kvgguf" bench memory
"$kvgguf" bench accuracy --quick --compare kvpress
"$kvgguf" bench accuracy --tasks niah_single,niah_multivalue,fact_qa --lengths 1024,2048 --samples 5 \
    --keeps 1.0,0.5,0.2 --policies kvzip,kvzip-token,snapkv,streaming --settings query-agnostic \
    -o docs/benchmarks/kvzip
# kvzip-compare: seeds 0-29 as two halves side by side, one thread each, merged into one result
parts=$(mktemp -d)
pids=()
for first_seed in 0 15; do
    "$kvgguf" bench accuracy --tasks niah_single,niah_multivalue,fact_qa --lengths 1024 --samples 15 \
        --first-seed "$first_seed" --keeps 1.0,0.5,0.3,0.1 --policies kvzip,kvzip-token --settings query-agnostic \
        --compare kvpress --kvpress-methods kvzip,kvzip-head,kvzip-token --threads 1 -o "$parts/$first_seed" \
        2> "$parts/$first_seed.log" &
    pids+=($!)
done
for pid in "${pids[@]}"; do
    wait "$pid"
done
"$kvgguf" bench merge-accuracy "$parts/0/accuracy.json" "$parts/15/accuracy.json" -o docs/benchmarks/kvzip-compare
