"""kvgguf.Llama end to end on the real model: eviction inside completions, long prompts, bad input."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from kvgguf.text import haystack
import kvgguf
from kvgguf import Llama
from kvgguf._native import LIB_DIR, llama_cpp_api
from kvtest import last_logits

QUESTION = "\n\nQuestion: What is the secret code for the vault? Answer with the number."


def vault_messages(n_sentences: int, code: str = "4821") -> list[dict]:
    text = haystack(n_sentences, seed=3) + f" The secret code for the vault is {code}."
    return [{"role": "user", "content": text + QUESTION}]


@pytest.fixture(scope="module")
def streaming_llm(model_path):
    llm = Llama(model_path, n_ctx=512, n_threads=2, verbose=False, kv_eviction="streaming", kv_keep=0.2)
    yield llm
    llm.close()


def test_llama_cpp_loads_our_patched_library():
    """One native build: llama-cpp-python's bindings run on kvgguf's libllama, which has our symbols."""
    loaded = Path(llama_cpp_api._lib._name).resolve()
    assert loaded.parent == LIB_DIR
    for symbol in ("llama_memory_seq_rm_pos", "llama_memory_seq_positions", "llama_kv_compact",
                   "llama_memory_n_attended"):
        assert hasattr(llama_cpp_api._lib, symbol), symbol
    if sys.platform.startswith("linux"):
        maps = Path("/proc/self/maps").read_text()
        libllamas = {line.split()[-1] for line in maps.splitlines() if re.search(r"/libllama\.so", line)}
        assert libllamas == {str(LIB_DIR / "libllama.so")}


def test_prompt_longer_than_n_ctx_is_prefilled_in_chunks(streaming_llm):
    messages = vault_messages(90)
    n_prompt = len(streaming_llm.tokenize(messages[0]["content"].encode()))
    assert n_prompt > 2 * streaming_llm.n_ctx()
    out = streaming_llm.create_chat_completion(messages, max_tokens=24, temperature=0)
    assert "4821" in out["choices"][0]["message"]["content"]
    stats = streaming_llm.kv_stats()
    assert stats["evictions"] >= 2
    assert stats["cells_now"] <= streaming_llm.n_ctx()
    assert stats["attended_now"] <= streaming_llm.n_ctx()
    assert stats["bytes_freed"] == stats["cells_freed"] * 23040  # SmolLM2: 30 layers x (192 K + 192 V) x f16
    positions = streaming_llm.kv_positions()
    assert positions[-1] == streaming_llm.n_tokens - 1 and positions.size == stats["cells_now"]


def test_without_policy_a_long_prompt_gets_llama_cpp_pythons_error(model_path):
    llm = Llama(model_path, n_ctx=512, n_threads=2, verbose=False)
    try:
        with pytest.raises(ValueError, match="exceed context window"):
            llm.create_chat_completion(vault_messages(90), max_tokens=4)
    finally:
        llm.close()


def test_eviction_after_prefill_keeps_the_budget(model_path):
    llm = Llama(model_path, n_ctx=2048, n_threads=2, verbose=False, kv_eviction="streaming", kv_keep=0.25,
                kv_window=16, kv_sink=4)
    try:
        out = llm.create_chat_completion(vault_messages(40), max_tokens=16, temperature=0)
        n_prompt = out["usage"]["prompt_tokens"]
        assert "4821" in out["choices"][0]["message"]["content"]
        history = llm.kv_stats()["history"]
        assert len(history) == 1 and history[0]["cells_before"] == n_prompt
        expected = 20 + int(np.ceil(0.25 * (n_prompt - 20)))
        assert history[0]["cells_after"] == expected
        # the prompt's cells were evicted, then the completion's tokens were added
        assert llm.kv_stats()["cells_now"] == expected + out["usage"]["completion_tokens"]
        # a second call starts from an empty cache: the budget is taken of its own prompt only
        again = llm.create_chat_completion(vault_messages(30), max_tokens=4, temperature=0)
        n_prompt = again["usage"]["prompt_tokens"]
        assert llm.kv_stats()["history"][-1] == {"cells_before": n_prompt, "freed": n_prompt - (20 + int(np.ceil(
            0.25 * (n_prompt - 20)))), "cells_after": 20 + int(np.ceil(0.25 * (n_prompt - 20))), "granularity": "token",
            "compacted": True}
    finally:
        llm.close()


def test_streaming_output_and_stop_sequences_work_with_eviction(streaming_llm):
    chunks = list(streaming_llm.create_chat_completion(vault_messages(60), max_tokens=24, temperature=0,
                                                       stream=True))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert "4821" in text
    stopped = streaming_llm.create_chat_completion(vault_messages(60), max_tokens=24, temperature=0, stop=["48"])
    content = stopped["choices"][0]["message"]["content"]
    assert "48" not in content and stopped["choices"][0]["finish_reason"] == "stop"
    assert text.startswith(content)


def test_lossy_cache_is_never_reused_as_a_prefix(model_path, streaming_llm):
    """Two calls sharing a long prefix: the second answers exactly as a fresh model would."""
    first = vault_messages(60, code="4821")
    second = vault_messages(60, code="7390")
    streaming_llm.create_chat_completion(first, max_tokens=8, temperature=0)
    reused = streaming_llm.create_chat_completion(second, max_tokens=16, temperature=0)
    assert streaming_llm.kv_stats()["history"][-1]["cells_before"] <= streaming_llm.n_ctx()
    fresh_llm = Llama(model_path, n_ctx=512, n_threads=2, verbose=False, kv_eviction="streaming", kv_keep=0.2)
    try:
        fresh = fresh_llm.create_chat_completion(second, max_tokens=16, temperature=0)
    finally:
        fresh_llm.close()
    assert reused["choices"][0]["message"]["content"] == fresh["choices"][0]["message"]["content"]
    assert "7390" in reused["choices"][0]["message"]["content"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_eviction="nonsense"), "unknown kv_eviction policy 'nonsense'"),
    (dict(kv_eviction="streaming", kv_keep=0), "kv_keep must be in \\(0, 1\\].*got 0"),
    (dict(kv_eviction="streaming", kv_keep=1.5), "got 1.5"),
    (dict(kv_eviction="streaming", kv_keep=float("nan")), "got nan"),
    (dict(kv_eviction="streaming", kv_keep="half"), "got 'half'"),
    (dict(kv_eviction="streaming", kv_budget=100_000), "kv_budget=100000 is larger than n_ctx=512"),
    (dict(kv_eviction="streaming", kv_budget=10), "kv_budget=10 must exceed"),
    (dict(kv_eviction="streaming", kv_keep=0.5, kv_budget=300), "not both"),
    (dict(kv_eviction="streaming", kv_granularity="head"), "scores whole tokens"),
    (dict(kv_eviction="streaming", kv_window=-1), "kv_window must be >= 0"),
    (dict(kv_keep=0.5), "need a kv_eviction policy"),
])
def test_bad_settings_raise_and_the_model_stays_usable(model_path, streaming_llm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Llama(model_path, n_ctx=512, verbose=False, **kwargs)
    with pytest.raises(ValueError, match=message):
        streaming_llm.configure_kv_eviction(**{"kv_eviction": None, **kwargs})
    assert streaming_llm.kv_settings.policy_name == "streaming" and streaming_llm.kv_settings.keep == 0.2
    out = streaming_llm.create_chat_completion(vault_messages(10), max_tokens=16, temperature=0)
    assert "4821" in out["choices"][0]["message"]["content"]


def test_non_gguf_file_is_rejected(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 definitely a zip file")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        Llama(str(not_gguf), kv_eviction="streaming")
    with pytest.raises(ValueError, match="is not a file"):
        Llama(str(tmp_path / "missing.gguf"))


def test_default_model_ships_in_the_wheel():
    path = kvgguf.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000


def test_call_with_logprobs_past_n_ctx(model_path):
    """__call__ (create_completion) with logits_all and logprobs on a prompt longer than the cache."""
    llm = Llama(model_path, n_ctx=512, n_threads=2, verbose=False, logits_all=True, kv_eviction="snapkv",
                kv_keep=0.3)
    try:
        prompt = haystack(60, seed=5) + " The secret code for the vault is 4821. The secret code for the vault is"
        out = llm(prompt, max_tokens=5, temperature=0, logprobs=2)
        assert out["usage"]["prompt_tokens"] > 2 * llm.n_ctx()
        assert "4821" in out["choices"][0]["text"].replace(" ", "")
        top = out["choices"][0]["logprobs"]["top_logprobs"]
        assert len(top) == out["usage"]["completion_tokens"] and all(len(t) == 2 for t in top)
        assert llm.kv_stats()["cells_now"] <= llm.n_ctx()
    finally:
        llm.close()


@pytest.mark.parametrize("policy, n_tokens", [("streaming", 1000), ("kvzip", 800)])
def test_reset_then_eval_decodes_over_a_compressed_cache_like_a_plain_model(model_path, policy, n_tokens):
    """llama-cpp-python's low-level flow, reset() then eval(), on the cache a compression left: the stale cells go
    (as the parent's eval drops them), nothing is evicted, and the logits are a plain model's."""
    llm = Llama(model_path, n_ctx=1024, n_threads=2, verbose=False, kv_eviction=policy, kv_keep=0.25,
                kv_head_profile=None)
    plain = Llama(model_path, n_ctx=1024, n_threads=2, verbose=False)
    try:
        tokens = llm.tokenize(haystack(80, seed=7).encode())[:n_tokens]
        assert len(tokens) == n_tokens
        llm.create_completion(tokens, max_tokens=1, temperature=0)
        assert llm.kv_stats()["evictions"] == 1 and llm.kv_stats()["cells_now"] < n_tokens
        llm.reset()
        llm.eval(tokens)  # the stale cells plus these would not fit: counted, they forced an eviction
        assert llm.kv_stats()["evictions"] == 1
        assert llm.kv_positions().tolist() == list(range(n_tokens))
        plain.eval(tokens)
        assert np.array_equal(last_logits(llm), last_logits(plain))
    finally:
        llm.close()
        plain.close()


def next_logits(llm: Llama, token: int) -> np.ndarray:
    llm.eval([token])
    return last_logits(llm)


def test_snapshot_restore_gives_identical_logits(model_path):
    llm = Llama(model_path, n_ctx=1024, n_threads=2, verbose=False)
    prompt = llm.tokenize(haystack(20, seed=5).encode())
    other = llm.tokenize(haystack(25, seed=6).encode())
    llm.prefill(prompt)
    snapshot = llm.kv_snapshot()
    assert snapshot.tokens.tolist() == prompt
    reference = next_logits(llm, 42)
    llm.prefill(other)                      # the cache now holds something else
    llm.kv_restore(snapshot)
    assert llm.n_tokens == len(prompt) and llm.kv_positions().tolist() == list(range(len(prompt)))
    assert np.array_equal(next_logits(llm, 42), reference)
    llm.close()


def test_prefill_continues_a_restored_prefix_and_evicts_over_all_of_it(model_path):
    llm = Llama(model_path, n_ctx=1024, n_threads=2, verbose=False)
    tokens = llm.tokenize(haystack(30, seed=7).encode())
    llm.prefill(tokens[:-40])
    snapshot = llm.kv_snapshot()
    llm.configure_kv_eviction("snapkv", kv_keep=0.5, kv_granularity="token")
    llm.kv_restore(snapshot)
    llm.prefill(tokens[-40:], reset=False)
    stats = llm.kv_stats()
    assert stats["cells_before"] == len(tokens)
    assert stats["cells_after"] == llm.kv_settings.target_cells(len(tokens))
    # the observers were the last window: the protected tail is there, the positions never renumbered
    positions = llm.kv_positions()
    assert positions[-32:].tolist() == list(range(len(tokens) - 32, len(tokens)))
    # token-level compression can be snapshot and restored ...
    compressed = llm.kv_snapshot()
    assert compressed.head_positions is None
    llm.kv_restore(compressed)
    assert np.array_equal(llm.kv_positions(), positions)
    # ... and so can per-head compression: llama.cpp's state keeps the rows, the snapshot which token each
    # (layer, head, cell) holds
    llm.configure_kv_eviction("snapkv", kv_keep=0.5)
    llm.prefill(tokens)
    per_head = llm.kv_snapshot()
    layout = per_head.head_positions
    assert layout is not None and layout.shape == (30, 3, llm.kv_stats()["cells_now"])
    assert not (layout == layout[:1, :1]).all()  # the heads kept different tokens
    assert np.array_equal(layout.max(axis=(0, 1)), llm.kv_positions())  # a cell is at its largest token's position
    reference = next_logits(llm, 42)
    llm.prefill(tokens[:50])
    llm.kv_restore(per_head)
    assert np.array_equal(llm.kv_snapshot().head_positions, layout)
    assert np.array_equal(next_logits(llm, 42), reference)
    llm.close()


def test_restore_rejects_what_does_not_fit(model_path):
    big = Llama(model_path, n_ctx=1024, n_threads=2, verbose=False)
    big.prefill(big.tokenize(haystack(40, seed=8).encode()))
    snapshot = big.kv_snapshot()
    big.close()
    small = Llama(model_path, n_ctx=256, n_threads=2, verbose=False)
    assert snapshot.tokens.size > 256
    with pytest.raises(ValueError, match="does not fit"):
        small.kv_restore(snapshot)
    with pytest.raises(ValueError, match="takes a KVSnapshot or a CompressedContext"):
        small.kv_restore(b"not a snapshot")
    # still usable
    out = small.create_completion("The capital of France is", max_tokens=4, temperature=0)
    assert out["choices"][0]["text"]
    small.close()


def test_n_gpu_layers_defaults_to_llama_cpps_environment_variable(model_path, monkeypatch):
    """LLAMA_ARG_N_GPU_LAYERS (llama.cpp's tools read -ngl from it) is the default of n_gpu_layers; an explicit
    argument wins, and a value that is not a number is named. (On this CPU-only build nothing is offloaded: the
    setting is what is checked, and that the model still loads and answers.)"""
    monkeypatch.setenv("LLAMA_ARG_N_GPU_LAYERS", "7")
    llm = Llama(model_path, n_ctx=256, n_threads=2, verbose=False)
    explicit = Llama(model_path, n_ctx=256, n_threads=2, verbose=False, n_gpu_layers=0)
    try:
        assert llm.model_params.n_gpu_layers == 7 and explicit.model_params.n_gpu_layers == 0
        assert llm.create_completion("The capital of France is", max_tokens=4, temperature=0)["choices"][0]["text"]
    finally:
        explicit.close()
        llm.close()
    monkeypatch.setenv("LLAMA_ARG_N_GPU_LAYERS", "all")
    with pytest.raises(ValueError, match="LLAMA_ARG_N_GPU_LAYERS='all' is not a number of layers"):
        Llama(model_path, n_ctx=256, n_threads=2, verbose=False)
