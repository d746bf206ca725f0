#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: install kvgguf built with CUDA, run the test suite with every model's layers on
# the GPU (LLAMA_ARG_N_GPU_LAYERS, which kvgguf.Llama and the benches read), and `kvgguf bench speed` at 8K-32K with
# Qwen2.5-Coder-0.5B; everything it measured goes to docs/benchmarks/gpu/<device>/ (commit it).
#
#   bash scripts/gpu_check.sh            # the whole suite, then bench speed at 8K, 16K and 32K
#   bash scripts/gpu_check.sh --quick    # the eviction, tap, tier and policy tests, then bench speed at 8K
#
# The tests compare against references computed on the same device where they build them with kvgguf, and
# against plain llama_cpp.Llama / transformers (CPU) elsewhere: a failure there may be a tolerance that the GPU's
# summation order exceeds, which is what this run is for. The test log is kept either way; the exit status is
# the tests'.
set -uo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${1:-}" = "--quick" ] && quick=1
command -v nvidia-smi >/dev/null || { echo "gpu_check.sh: no nvidia-smi: this machine has no NVIDIA GPU" >&2; exit 2; }
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/[^A-Za-z0-9]\+/-/g; s/-$//')
out="docs/benchmarks/gpu/$device"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt"

start=$(date +%s)
CMAKE_ARGS="-DGGML_CUDA=ON ${CMAKE_ARGS:-}" bash scripts/install.sh test > "$out/install.log" 2>&1 \
    || { echo "gpu_check.sh: the CUDA install failed, see $out/install.log" >&2; exit 1; }
echo "install with CUDA: $(( $(date +%s) - start )) s" | tee "$out/timings.txt"

export LLAMA_ARG_N_GPU_LAYERS=999
tests=(tests)
[ $quick = 1 ] && tests=(tests/test_eviction_engine.py tests/test_attention_tap.py tests/test_tiered_cache.py
                          tests/test_policies.py tests/test_lazy.py tests/test_model_families.py)
start=$(date +%s)
.venv/bin/python -m pytest -q -n 2 --dist loadfile "${tests[@]}" 2>&1 | tee "$out/tests.log"
status=${PIPESTATUS[0]}
echo "tests (${tests[*]}): exit $status, $(( $(date +%s) - start )) s" | tee -a "$out/timings.txt"

lengths=8192,16384,32768
[ $quick = 1 ] && lengths=8192
.venv/bin/kvgguf bench speed -m qwen2.5-coder-0.5b-instruct --lengths "$lengths" --no-baseline --threads 4 \
    -o "$out/speed" 2>&1 | tail -40
exit "$status"
