#!/usr/bin/env bash
# Regenerate every benchmark result committed under docs/benchmarks/ on the default model (about 2.5 hours on
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
"$kvgguf" bench accuracy --tasks niah_single,niah_multivalue,fact_qa --lengths 1024 --samples 10 \
    --keeps 1.0,0.5,0.3,0.1 --policies kvzip,kvzip-token --settings query-agnostic --compare kvpress \
    --kvpress-methods kvzip,kvzip-head,kvzip-token -o docs/benchmarks/kvzip-compare
