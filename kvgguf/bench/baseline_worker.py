"""The unpatched-llama.cpp side of ``kvgguf bench speed``, run as a separate process.

One process can load only one libllama, so the baseline (the pinned llama.cpp built without our patches,
scripts/build_baseline.sh) runs here, started by path (not as part of the kvgguf package, whose import would
point llama-cpp-python at the patched library) with ``LLAMA_CPP_LIB_PATH`` set to the baseline's directory.

Protocol: one JSON object per line on stdin, one reply per line on stdout.
  {"op": "load", "model": path, "n_ctx": int, "threads": int}   -> {"ok": true, "patched": false}
  {"op": "prefill", "tokens": [...]}                             -> {"seconds": float}
  {"op": "decode", "tokens": [...]}                              -> {"latencies": [float, ...]}
  {"op": "close"}                                                -> {"ok": true}, then the process exits
Errors come back as {"error": "..."}.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# started by path: this directory is sys.path[0]; drop it so that nothing here shadows an installed module
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

import llama_cpp  # noqa: E402  (LLAMA_CPP_LIB_PATH is read at import)


class Baseline:
    def __init__(self) -> None:
        self.llm: llama_cpp.Llama | None = None

    def load(self, model: str, n_ctx: int, threads: int) -> dict[str, Any]:
        # offloaded as kvgguf.Llama is (LLAMA_ARG_N_GPU_LAYERS), so that the comparison is like for like
        self.llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                   n_gpu_layers=int(os.environ.get("LLAMA_ARG_N_GPU_LAYERS") or 0), verbose=False)
        # a patched library exports our eviction API; the baseline must not
        patched = hasattr(llama_cpp.llama_cpp._lib, "llama_kv_compact")
        return {"ok": True, "patched": patched, "library": os.environ.get("LLAMA_CPP_LIB_PATH")}

    def prefill(self, tokens: list[int]) -> dict[str, Any]:
        assert self.llm is not None
        self.llm.reset()
        start = time.perf_counter()
        self.llm.create_completion(tokens, max_tokens=1, temperature=0)
        return {"seconds": time.perf_counter() - start}

    def decode(self, tokens: list[int]) -> dict[str, Any]:
        assert self.llm is not None
        latencies = []
        for token in tokens:
            start = time.perf_counter()
            self.llm.eval([token])
            latencies.append(time.perf_counter() - start)
        return {"latencies": latencies}


def main() -> int:
    baseline = Baseline()
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op == "close":
                reply: dict[str, Any] = {"ok": True}
            else:
                reply = getattr(baseline, op)(**request)
        except Exception as error:  # reported to the parent, which raises it
            reply = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if op == "close":
            break
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
