"""Patch 0010 on hosts with AMX: a prompt decodes through the AMX weight buffers (it crashed before) and gives the
logits of the plain CPU path.

Each decode runs in a child process (this file run as a script), so that a crash reads as a failed test instead
of ending the suite. Skipped where ggml reports no AMX_INT8 (the AMX kernels are not built there).
"""
from __future__ import annotations

import json
import subprocess
import sys

import llama_cpp
import numpy as np
import pytest

from kvtest import kl_divergence

PROMPT = "The quick brown fox jumps over the lazy dog. " * 8   # 81 tokens: the multi-token (AMX tile) path
# The AMX kernels repack the weights and sum in another order than the plain Q4_1 x Q8_1 dot products. Measured on
# a Sapphire Rapids host (2026-12-02, n = 1 prompt, deterministic): the last row's KL(plain || AMX) 0.0016, max
# |logit difference| 0.70, the same top token by a margin of 3.6. The bound is ten times the measured KL, about the
# spread of full-cache KLs between hosts in test_head_granular_reference (0.0016-0.0102).
MAX_KL = 0.02


def decode_last_logits(model: str, use_extra_bufts: bool) -> dict:
    """Decode PROMPT in one batch; the last row's logits and whether the weights went to AMX buffers."""
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = use_extra_bufts
    weights = llama_cpp.llama_model_load_from_file(model.encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(weights)
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = 256
    context_params.n_threads = context_params.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(weights, context_params)
    raw = PROMPT.encode()
    tokens = (llama_cpp.llama_token * 256)()
    n = llama_cpp.llama_tokenize(vocab, raw, len(raw), tokens, 256, True, True)
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, n)) == 0
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(weights)
    return {"n_tokens": n, "logits": logits.tolist()}


def run_child(model: str, use_extra_bufts: bool) -> tuple[dict, str]:
    child = subprocess.run([sys.executable, __file__, model, str(int(use_extra_bufts))], capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, f"the decode ended with {child.returncode}:\n{child.stderr[-2000:]}"
    return json.loads(child.stdout), child.stderr


def test_a_prompt_decodes_through_amx_as_through_the_plain_path(model_path):
    if "AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode():
        pytest.skip("ggml reports no AMX_INT8 on this host")
    amx, log = run_child(model_path, use_extra_bufts=True)
    assert "AMX model buffer size" in log      # the weights really went to the AMX buffer type
    plain, log_plain = run_child(model_path, use_extra_bufts=False)
    assert "AMX model buffer size" not in log_plain
    assert amx["n_tokens"] == plain["n_tokens"] > 64
    logits_amx, logits_plain = (np.array(result["logits"], dtype=np.float64) for result in (amx, plain))
    assert kl_divergence(logits_plain, logits_amx) < MAX_KL
    assert np.argmax(logits_amx) == np.argmax(logits_plain)


if __name__ == "__main__":
    print(json.dumps(decode_last_logits(sys.argv[1], bool(int(sys.argv[2])))))
