"""Run by tests/test_rpc.py in a child process (a registered RPC server stays a device of the process that
registered it, and a plain llama_cpp.Llama loaded later would offload to it): the default model on one host and
split with an RPC server, through the same steps. Prints one JSON object of what the test compares.

    python tests/rpc_split.py MODEL ENDPOINT LAYERS TMPDIR
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import kvgguf  # noqa: E402
from kvgguf.text import filler_sentences  # noqa: E402
from kvtest import last_logits  # noqa: E402

N_CTX = 2048
NEEDLE = "The secret code for the vault is 4821."
QUESTION = "What is the secret code for the vault? Answer with the number."
GREEDY = {"max_tokens": 16, "temperature": 0.0}


def main() -> None:
    model_path, endpoint, layers, tmp = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    sentences = filler_sentences(60, seed=4)
    sentences.insert(18, NEEDLE)
    document = " ".join(sentences)
    common = {"n_ctx": N_CTX, "n_batch": 512, "n_threads": 1, "kv_head_profile": None}
    local = kvgguf.Llama(model_path, verbose=False, **common)
    print("--- remote model log", file=sys.stderr, flush=True)
    remote = kvgguf.Llama(model_path, verbose=True, rpc_servers=endpoint, n_gpu_layers=layers, **common)
    print("--- end of remote model log", file=sys.stderr, flush=True)
    pair = (local, remote)
    out: dict = {}

    # no eviction: the split computes what one host computes
    tokens = local.tokenize(f"{document}\n\n{QUESTION}".encode())
    for llm in pair:
        llm.eval(tokens)
    out["logits_max_diff"] = float(np.abs(last_logits(remote) - last_logits(local)).max())

    # SnapKV on the prompt
    messages = [{"role": "user", "content": f"{document}\n\n{QUESTION}"}]
    for llm in pair:
        llm.configure_kv_eviction("snapkv", kv_keep=0.3)
    out["snapkv_answers"] = [llm.create_chat_completion(messages, **GREEDY)["choices"][0]["message"]["content"]
                             for llm in pair]
    out["snapkv_stats"] = [{key: llm.kv_stats()[key] for key in ("evictions", "cells_before", "cells_after")}
                           for llm in pair]
    out["snapkv_positions_equal"] = bool(np.array_equal(remote.kv_positions(), local.kv_positions()))

    # KVzip (the shipped head profile, which configure_kv_eviction turned on: each head its share, in tiers)
    contexts = [llm.compress(document, keep=0.3, policy="kvzip") for llm in pair]
    out["kvzip_tiered"] = [context.tiers is not None for context in contexts]
    out["kvzip_tier_held"] = [context.tier_held.tolist() for context in contexts]
    out["kvzip_positions_equal"] = bool(np.array_equal(contexts[1].positions, contexts[0].positions))
    shared = []   # per (tier, head): the share of its tokens both sides keep
    for mine, theirs in zip(contexts[1].head_positions, contexts[0].head_positions):
        if (mine is None) != (theirs is None):
            shared.append(0.0)
        elif mine is not None:
            shared += [np.intersect1d(a, b).size / a.size for a, b in zip(mine, theirs)]
    out["kvzip_head_tokens_shared_min"] = min(shared, default=1.0)
    out["kvzip_kept_ratio"] = contexts[1].kept_ratio
    out["kvzip_replies"] = [llm.ask(context, QUESTION, **GREEDY) for llm, context in zip(pair, contexts)]
    out["kvzip_reply_from_file"] = remote.ask(remote.load_context(contexts[1].save(tmp / "split.kvc")), QUESTION,
                                              **GREEDY)
    remote.close()
    local.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
