#!/usr/bin/env bash
# Build the pinned llama.cpp (llama-cpp-python 0.3.36's vendor tree) *without* our patches (but for the upstream
# crash fixes marked "Baseline: applied", e.g. 0010 for AMX hosts), with the same
# CMakeLists and flags as the kvgguf wheel: the baseline `kvgguf bench speed` compares against, to show that the
# patches cost nothing when eviction is off. The libraries go to
#   ${KVGGUF_BASELINE_DIR:-~/.cache/kvgguf/baseline-0.3.36}/kvgguf/lib
# where `kvgguf bench speed` finds them (or pass --baseline-lib DIR). CMAKE_ARGS reach ggml as for the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."

dest=${KVGGUF_BASELINE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kvgguf/baseline-0.3.36}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags, as for pip
cmake -S . -B "$dest/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DKVGGUF_APPLY_PATCHES=OFF ${CMAKE_ARGS:-}
cmake --build "$dest/build" --target kvgguf
cmake --install "$dest/build" --prefix "$dest"
echo "$dest/kvgguf/lib"
