#!/usr/bin/env bash
# Regenerate every benchmark result committed under docs/benchmarks/ on the default model (and bench reasoning's on
# Qwen2.5-Coder-1.5B; about 10.5 hours on 2 cores; run it alone on the machine: `bench speed` times against an
# unpatched llama.cpp in the same run).
# The Qwen long-context results (docs/benchmarks/long/) have their own command in docs/benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE

.venv/bin/python -c 'import kvpress, matplotlib' 2>/dev/null || .venv/bin/python -m pip install --disable-pip-version-check '.[compare,bench]'
bash scripts/build_baseline.sh >/dev/null   # the unpatched llama.cpp (incremental after the first time)

kvgguf=.venv/bin/kvgguf

# in_halves OUT SAMPLES ARGS...: `bench accuracy ARGS` over seeds FIRST_SEED .. FIRST_SEED+SAMPLES-1 (FIRST_SEED
# 0 unless set) as two halves side by side, one thread each (more throughput on 2 cores than one run on two
# threads; the answers are the same), merged into OUT
in_halves() {
    local out=$1 samples=$2 first=${FIRST_SEED:-0}
    shift 2
    local half=$((samples / 2)) parts pids=()
    parts=$(mktemp -d)
    "$kvgguf" bench accuracy "$@" --samples "$half" --first-seed "$first" --threads 1 -o "$parts/a" \
        2> "$parts/a.log" &
    pids+=($!)
    "$kvgguf" bench accuracy "$@" --samples $((samples - half)) --first-seed $((first + half)) --threads 1 \
        -o "$parts/b" 2> "$parts/b.log" &
    pids+=($!)
    for pid in "${pids[@]}"; do
        wait "$pid"
    done
    "$kvgguf" bench merge-accuracy "$parts/a/accuracy.json" "$parts/b/accuracy.json" -o "$out"
}

"$kvgguf" bench speed
"$kvgguf" bench memory
"$kvgguf" bench serve
"$kvgguf" bench accuracy --quick --compare kvpress
in_halves docs/benchmarks/kvzip 10 --tasks niah_single,niah_multivalue,fact_qa --lengths 1024,2048 \
    --keeps 1.0,0.5,0.2 --policies kvzip@head,kvzip@token,snapkv,streaming --settings query-agnostic
in_halves docs/benchmarks/kvzip-compare 30 --tasks niah_single,niah_multivalue,fact_qa --lengths 1024 \
    --keeps 1.0,0.5,0.3,0.1 --policies kvzip@head,kvzip@token --settings query-agnostic \
    --compare kvpress --kvpress-methods kvzip,kvzip-head,kvzip-token
# unequal per-head budgets (the head profile in a tiered cache) beside kvpress's global KVzip, and what they cost
in_halves docs/benchmarks/tiered 8 --tasks niah_single,fact_qa,prose_niah,prose_fact --lengths 1024 \
    --keeps 1.0,0.5,0.3,0.2,0.1 --policies kvzip+profile,kvzip-head,kvzip@token,kvzip@head --settings query-agnostic \
    --compare kvpress --kvpress-methods kvzip,kvzip-profile
# ... the default kv_tiers (3) on eight more seeds, beside kvpress
FIRST_SEED=8 in_halves docs/benchmarks/tiered/seeds-8-15 8 --tasks niah_single,fact_qa,prose_niah,prose_fact \
    --lengths 1024 --keeps 1.0,0.5,0.3,0.2,0.1 --policies kvzip+profile --settings query-agnostic \
    --compare kvpress --kvpress-methods kvzip,kvzip-profile
"$kvgguf" bench speed --lengths 2048,4096 --policies kvzip,kvzip+tiers2,kvzip+profile,kvzip+tiers4,kvzip-head \
    --no-baseline -o docs/benchmarks/tiered
"$kvgguf" bench speed --lengths 4096 --policies kvzip+profile,kvzip-head --no-baseline --threads 1 \
    -o docs/benchmarks/tiered/speed-1-thread
# ... and on a model four times larger (its profile ships too): is the decode gap per-node overhead?
"$kvgguf" bench speed -m qwen2.5-coder-0.5b-instruct --lengths 4096 --policies kvzip,kvzip+profile,kvzip-head \
    --no-baseline --threads 1 -o docs/benchmarks/tiered/qwen-speed
in_halves docs/benchmarks/tiered/qwen-accuracy 4 -m qwen2.5-coder-0.5b-instruct \
    --tasks niah_single,fact_qa,prose_niah,prose_fact --lengths 1024 --keeps 1.0,0.3,0.1 \
    --policies kvzip,kvzip+profile --settings query-agnostic
"$kvgguf" bench memory --policies kvzip,kvzip+profile,kvzip-head -o docs/benchmarks/tiered
# how many tiers: kvpress's KVzip with the profile's budgets unquantized and grouped into 2-4 tiers
in_halves docs/benchmarks/tier-count 8 --tasks niah_single,fact_qa,prose_niah,prose_fact --lengths 1024 \
    --keeps 1.0,0.3,0.2,0.1 --policies kvzip+profile --settings query-agnostic \
    --compare kvpress --kvpress-methods kvzip-profile,kvzip-tiers2,kvzip-tiers3,kvzip-tiers4
# ... and our runtime in 2-4 tiers (kv_tiers)
in_halves docs/benchmarks/tier-count/runtime 8 --tasks niah_single,fact_qa,prose_niah,prose_fact --lengths 1024 \
    --keeps 1.0,0.3,0.2,0.1 --policies kvzip+tiers2,kvzip+tiers3,kvzip+tiers4 --settings query-agnostic
# LookaheadKV (the module shipped for the default model): query-aware accuracy beside SnapKV, KVzip and
# StreamingLLM, paired with SnapKV answer by answer; the full cache alone on the two tasks it cannot do; how well
# each policy's scores foresee the answer's attention on train-lookahead's held-out prompts; its scoring's cost
in_halves docs/benchmarks/lookahead 20 --tasks niah_single,niah_multikey,niah_multivalue,fact_qa,prose_niah,prose_fact \
    --lengths 1024 --keeps 1.0,0.5,0.3,0.2,0.1 --policies lookahead,snapkv,kvzip,streaming --settings query-aware \
    --paired-against snapkv
"$kvgguf" bench accuracy --tasks common_words,variable_tracking --lengths 1024 --keeps 1.0 --policies lookahead \
    --samples 20 --settings query-aware -o docs/benchmarks/lookahead/full-cache
"$kvgguf" bench scores --policies lookahead,snapkv,kvzip -o docs/benchmarks/lookahead
"$kvgguf" bench speed --policies lookahead,snapkv --no-baseline -o docs/benchmarks/lookahead
# decode-time policies: what following every decoded token costs h2o, tova and lazy at 1K / 2K / 4K cells (one
# thread: two under OMP_WAIT_POLICY=PASSIVE spend a decode step in thread wake-ups, noisier than what is measured)
"$kvgguf" bench speed --lengths 1024 --policies streaming --rounds 8 --prefill-rounds 1 --no-baseline --threads 1 \
    --tracking h2o,tova,lazy -o docs/benchmarks/decode-tracking
# LazyEviction beside H2O, TOVA and StreamingLLM on step-by-step answers (Qwen2.5-Coder-1.5B, the largest model
# here: 22 PyPI wheels): the model's calibration (kvgguf/lazy_windows/) first, then 30 gsm_symbolic problems in
# two processes of one thread sharing the rows file, then the report over all 30 (about 75 minutes)
"$kvgguf" calibrate-lazy -m qwen2.5-coder-1.5b-instruct --alpha 1e-4 --threads 1 \
    -o kvgguf/lazy_windows/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.json
rm -f docs/benchmarks/reasoning/reasoning.rows.jsonl  # answers of an earlier run would be resumed, not redone
for first in 0 15; do
    "$kvgguf" bench reasoning -m qwen2.5-coder-1.5b-instruct --samples 15 --first-seed "$first" --threads 1 \
        -o docs/benchmarks/reasoning &
done
wait
"$kvgguf" bench reasoning -m qwen2.5-coder-1.5b-instruct --samples 30 --threads 1 -o docs/benchmarks/reasoning
