"""Models with ALiBi (a tiny random MPT written with gguf-py, tests/tiny_models.py): ALiBi biases every key by its
cell's one position, so per-head eviction (cells holding different tokens per KV head) would silently change the
model's attention; it is refused with a clear error, at the API edge and in llama.cpp. Token-level eviction keeps
each cell's own position and stays allowed: its logits equal upstream removal of the same cells."""
from __future__ import annotations

import numpy as np
import pytest

from kvgguf import Llama
from kvgguf._native import NativeError
from kvtest import RandomEviction, last_logits
from tiny_models import write_tiny_alibi_model

PROMPT = "the quick brown fox jumps over the lazy dog " * 5


@pytest.fixture(scope="module")
def alibi_model(tmp_path_factory) -> str:
    return write_tiny_alibi_model(tmp_path_factory.mktemp("alibi") / "tiny-mpt-alibi.gguf")


def test_per_head_eviction_is_refused_with_a_clear_error(alibi_model):
    with pytest.raises(ValueError, match="kv_granularity='head' \\(for 'snapkv'\\).*ALiBi.*kv_granularity='token'"):
        Llama(alibi_model, n_ctx=256, n_threads=1, verbose=False, kv_eviction="snapkv")  # snapkv's default: per head
    llm = Llama(alibi_model, n_ctx=256, n_threads=1, verbose=False, kv_eviction="snapkv", kv_granularity="token",
                kv_keep=0.5)
    try:
        with pytest.raises(ValueError, match="ALiBi"):
            llm.configure_kv_eviction("kvzip", kv_granularity="head")
        with pytest.raises(ValueError, match="ALiBi"):
            llm.compress(llm.tokenize(PROMPT.encode()), policy="snapkv", granularity="head")
        assert llm.kv_settings.granularity == "token"           # the old settings stay, the model works
        out = llm.create_completion(PROMPT, max_tokens=4, temperature=0)
        stats = llm.kv_stats()
        assert stats["evictions"] == 1 and stats["cells_after"] < out["usage"]["prompt_tokens"]
        assert stats["history"][-1]["granularity"] == "token"
    finally:
        llm.close()


def test_llama_cpp_refuses_per_head_lists_and_changes_nothing(alibi_model):
    llm = Llama(alibi_model, n_ctx=256, n_threads=1, verbose=False)
    try:
        llm.eval(llm.tokenize(PROMPT.encode()))
        cache = llm.kv_controller.engine.cache
        assert not cache.can_compact_per_head()
        positions = cache.positions()
        recent = positions[-100:]
        older = np.append(positions[-150:-51], positions[-1])   # as long, with the newest cell too
        lists = np.stack([np.stack([recent, older, recent, older])] * 2)  # [n_layer, n_head_kv, n_keep]
        with pytest.raises(NativeError, match="ALiBi"):
            cache.compact(lists)
        assert np.array_equal(cache.positions(), positions)
    finally:
        llm.close()


def test_token_level_eviction_equals_upstream_removal(alibi_model):
    """The same cells evicted by the engine (removed and compacted) or removed one by one with upstream
    llama_memory_seq_rm: the next logits agree (each cell keeps its position, so ALiBi's bias is the same)."""
    llm = Llama(alibi_model, n_ctx=256, n_threads=1, verbose=False)
    try:
        tokens = llm.tokenize(PROMPT.encode())
        llm.eval(tokens)
        snapshot = llm.kv_snapshot()
        engine = llm.kv_controller.engine
        positions = engine.cache.positions()
        eviction = RandomEviction.of(positions, positions.size // 2, seed=1)
        engine.evict(positions, eviction.scores, eviction.n_keep, eviction.protect)
        assert engine.cache.n_cells() == eviction.n_keep and engine.cache.n_attended() == 256
        llm.eval(tokens[:3])
        evicted = last_logits(llm)
        llm.kv_restore(snapshot)
        eviction.remove_upstream(engine.cache.memory)
        llm.eval(tokens[:3])
        np.testing.assert_allclose(evicted, last_logits(llm), rtol=1e-5, atol=1e-6)
    finally:
        llm.close()
