"""Shifting positions (llama.cpp's context shift) through kvgguf.Llama.kv_shift: cells that a per-head eviction
filled with different tokens per KV head have no single position, so llama.cpp refuses to shift them, also after
their state was saved and loaded again (llama.cpp's state format does not keep that), and kv_shift says so with a
ValueError; a plain range shifts, and input_ids follow."""
from __future__ import annotations

import numpy as np
import pytest

from kvgguf import Llama
from kvgguf._native import llama_cpp_api as C
from kvgguf.text import haystack
from kvtest import kl_divergence, last_logits


@pytest.fixture(scope="module")
def llm(model_path):
    model = Llama(model_path, n_ctx=1024, n_threads=2, verbose=False, kv_eviction="snapkv", kv_keep=0.3)
    yield model
    model.close()


def test_head_mixed_cells_are_never_shifted_after_a_restore(llm):
    tokens = llm.tokenize(haystack(35, seed=1).encode())
    llm.prefill(tokens)                                     # snapkv evicts per KV head
    cache = llm.kv_controller.engine.cache
    n_mixed = cache.n_mixed()
    assert n_mixed > 0
    snapshot = llm.kv_snapshot()
    llm.kv_restore(snapshot)
    assert cache.n_mixed() == n_mixed                       # llama.cpp's state came back without the flag
    positions = llm.kv_positions().copy()
    C.llama_memory_seq_add(cache.memory, 0, 0, -1, 7)       # llama.cpp itself refuses (and only logs)
    assert np.array_equal(llm.kv_positions(), positions)
    with pytest.raises(ValueError, match=r"positions \[0, \d+\) hold tokens of cells that a per-head eviction"):
        llm.kv_shift(7)
    assert np.array_equal(llm.kv_positions(), positions)


def test_a_compressed_context_file_keeps_its_cells_unshiftable(llm, tmp_path):
    compressed = llm.compress(haystack(35, seed=2), keep=0.3, granularity="head")
    loaded = llm.load_context(compressed.save(tmp_path / "doc.kvc"))
    llm.kv_restore(loaded)
    cache = llm.kv_controller.engine.cache
    assert cache.n_mixed() > 0
    positions = llm.kv_positions().copy()
    C.llama_memory_seq_add(cache.memory, 0, 0, -1, 3)
    assert np.array_equal(llm.kv_positions(), positions)
    with pytest.raises(ValueError, match="per-head eviction"):
        llm.kv_shift(3)
    llm.kv_restore(loaded)
    assert llm.ask(loaded, "What is in the harbour town?", max_tokens=8, temperature=0)  # still usable


def test_a_plain_range_shifts_and_the_tokens_follow(model_path):
    """Context shift as llama.cpp does it: remove [0, 100), move [100, 300) down by 100. Every kept token moved
    by the same delta, so the next tokens see the same relative positions as in the unshifted cache: the same
    logits up to the rounding of the K-shift (RoPE applied to stored f16 keys)."""
    llm = Llama(model_path, n_ctx=1024, n_threads=2, verbose=False)
    try:
        tokens = llm.tokenize(haystack(20, seed=3).encode())[:300]
        probe = llm.tokenize(b" The baker", add_bos=False)
        llm.eval(tokens)
        snapshot = llm.kv_snapshot()
        memory = llm.kv_controller.engine.cache.memory
        C.llama_memory_seq_rm(memory, 0, 0, 100)
        llm.eval(probe)                                         # at positions 300.. over the cells 100..299
        unshifted = last_logits(llm)
        llm.kv_restore(snapshot)
        C.llama_memory_seq_rm(memory, 0, 0, 100)
        with pytest.raises(ValueError, match="below 0"):
            llm.kv_shift(-101, p0=100)
        with pytest.raises(ValueError, match="delta != 0"):
            llm.kv_shift(0)
        llm.kv_restore(snapshot)
        C.llama_memory_seq_rm(memory, 0, 0, 100)
        llm.kv_shift(-100, p0=100)
        assert llm.n_tokens == 200 and llm.kv_positions().tolist() == list(range(200))
        assert llm.input_ids[:200].tolist() == tokens[100:]
        llm.eval(probe)                                         # at positions 200..
        shifted = last_logits(llm)
        # a shift onto positions the cache holds is refused, and changes nothing
        positions = llm.kv_positions().copy()
        with pytest.raises(ValueError, match="would put tokens on positions the cache holds"):
            llm.kv_shift(-5, p0=100)
        assert np.array_equal(llm.kv_positions(), positions)
    finally:
        llm.close()
    assert shifted.argmax() == unshifted.argmax()
    assert kl_divergence(unshifted, shifted) < 1e-3
