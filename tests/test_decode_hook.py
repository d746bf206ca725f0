"""The decode-step hook on the real model: a policy that observes decoding (H2O) is shown every decoded token's
attention over the cells, keeps per-cell state that the engine maps through each eviction, and with
kv_evict_every = W the cache goes back to the budget every W tokens, its freed cells left as holes for the
next tokens instead of a compaction."""
from __future__ import annotations

import numpy as np
import pytest

import kvgguf.policies
from kvgguf import Llama
from kvgguf.policies.h2o import H2OPolicy
from kvgguf.text import haystack
from kvtest import RandomEviction, RawContext, SoftMaxCapture, kl_divergence, last_logits


def greedy_tokens(llm: Llama, prompt: list[int]):
    """Greedy tokens after ``prompt`` (end of text suppressed), as llm.generate yields them."""
    eos = llm.token_eos()

    def no_eos(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        logits[eos] = -np.inf
        return logits

    return llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, logits_processor=[no_eos])


def greedy(llm: Llama, n: int, prompt: list[int]) -> list[int]:
    out: list[int] = []
    for token in greedy_tokens(llm, prompt):
        out.append(token)
        if len(out) == n:
            break
    return out


def prompt_tokens(llm: Llama, n_sentences: int, seed: int = 6) -> list[int]:
    text = haystack(n_sentences, seed=seed) + " Continue the story."
    return llm.tokenize(text.encode())


def test_h2o_sums_the_attention_llama_cpp_computes(model_path, raw_model):
    """Without an eviction, H2O's state is the attention every decoded token (prompt and generated) paid each
    cell, summed per (layer, KV head) over the tokens and averaged over the query heads of the group: the same
    sums from llama.cpp's own softmax (kq_soft_max, flash attention off) over the same decodes."""
    llm = Llama(model_path, n_ctx=512, n_threads=2, verbose=False, kv_eviction="h2o", kv_budget=480)
    try:
        prompt = prompt_tokens(llm, 10)
        generated = greedy(llm, 24, prompt)
        received = llm.kv_controller.policy.received.values
        assert llm.kv_stats()["evictions"] == 0
    finally:
        llm.close()
    tokens = prompt + generated[:-1]  # the last sampled token was never decoded
    capture = SoftMaxCapture()
    raw = RawContext(raw_model, n_ctx=512, cb_eval=capture)
    try:
        raw.decode(prompt)
        for token in generated[:-1]:
            capture.new_ubatch()
            raw.decode([token])
    finally:
        raw.close()
    n_cells = len(tokens)
    expected = np.zeros((raw_model.n_layer, 9, n_cells))
    for call in capture.calls:
        for il, probs in call.items():               # [n_head, n_rows, n_kv]
            n_kv = min(probs.shape[2], n_cells)
            expected[il, :, :n_kv] += probs[:, :, :n_kv].sum(axis=1)
    expected = expected.reshape(raw_model.n_layer, 3, 3, n_cells).mean(axis=2)
    assert received.shape == (30, 3, n_cells)
    np.testing.assert_allclose(received, expected, rtol=2e-4, atol=1e-5)


class RecordingH2O(H2OPolicy):
    """H2O that also records what the hook showed it: every step's attention and positions, and every
    eviction's cells (a test double around the real policy; the registry entry is the test's)."""

    name = "h2o-recorded"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[np.ndarray, np.ndarray, int]] = []

    def observe_step(self, attention, positions, n_queries):
        self.steps.append((attention.copy(), positions.copy(), n_queries))
        super().observe_step(attention, positions, n_queries)


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setitem(kvgguf.policies.POLICIES, RecordingH2O.name, RecordingH2O)
    return RecordingH2O.name


def test_state_follows_the_kept_cells_through_evictions(model_path, recording):
    """Over 120 generated tokens with the cache brought back to 80 cells every 8 tokens, the state of every
    cell the cache holds is the sum of what the hook showed for that cell's position at every step since it was
    decoded (a NumPy reference keyed by position), and the cache never held more than 80 + 8 cells."""
    budget, every = 80, 8
    llm = Llama(model_path, n_ctx=512, n_threads=2, verbose=False, kv_eviction=recording, kv_budget=budget,
                kv_evict_every=every, kv_window=8)
    try:
        prompt = prompt_tokens(llm, 6)
        peak = 0
        for i, _ in enumerate(greedy_tokens(llm, prompt)):
            peak = max(peak, llm.kv_stats()["cells_now"])
            if i == 120:
                break
        policy = llm.kv_controller.policy
        history = llm.kv_stats()["history"]
        positions = llm.kv_positions()
    finally:
        llm.close()
    decode_time = history[1:]  # the first is the prompt's
    assert len(decode_time) >= 10 and all(h["cells_after"] == budget for h in decode_time)
    assert not any(h["compacted"] for h in decode_time)  # 8 holes, refilled by the next 8 tokens
    assert peak <= budget + every
    reference: dict[int, np.ndarray] = {}
    for attention, step_positions, n_queries in policy.steps:
        for j, position in enumerate(step_positions.tolist()):
            reference[position] = reference.get(position, 0.0) + attention[:, :, j].astype(np.float64) * n_queries
    expected = np.stack([reference[p] for p in positions.tolist()], axis=-1)
    np.testing.assert_allclose(policy.received.values, expected, rtol=1e-5, atol=1e-7)


def test_holes_left_by_an_eviction_answer_like_upstream_removal(model_path):
    """The same cells removed from one prefilled cache three ways: left as holes (what kv_evict_every does),
    removed one by one with upstream llama_memory_seq_rm, or compacted. Holes and upstream removal give
    bit-identical next-token logits; the compacted cache differs only in the order of the float sums (on this
    model that moves logits by up to ~0.5, see test_eviction_engine.py; KL here 1.3e-3, the same top-1). The
    holes are refilled by the next tokens, so the attention window stays that of the full cache."""
    llm = Llama(model_path, n_ctx=1024, n_threads=2, verbose=False)
    try:
        tokens = prompt_tokens(llm, 30)[:600]
        llm.eval(tokens)
        snapshot = llm.kv_snapshot()
        engine = llm.kv_controller.engine
        positions = engine.cache.positions()
        eviction = RandomEviction.of(positions, positions.size - 16, seed=0)
        logits, attended = {}, {}
        for how in ("holes", "compacted", "upstream"):
            llm.kv_restore(snapshot)
            if how == "upstream":
                eviction.remove_upstream(engine.cache.memory)
            else:
                engine.evict(positions, eviction.scores, eviction.n_keep, eviction.protect,
                             compact=how == "compacted")
            assert engine.cache.n_cells() == eviction.n_keep
            llm.eval(llm.tokenize(b" The lighthouse keeper", add_bos=False))
            logits[how] = last_logits(llm)
            attended[how] = engine.cache.n_attended()
    finally:
        llm.close()
    np.testing.assert_array_equal(logits["holes"], logits["upstream"])
    assert kl_divergence(logits["holes"], logits["compacted"]) < 1e-2
    assert attended["holes"] == attended["upstream"] == 768  # 600 cells in use, padded to 256


def test_kv_evict_every_needs_a_policy_that_evicts_while_decoding(model_path):
    with pytest.raises(ValueError, match="kv_evict_every needs a policy that evicts while decoding"):
        Llama(model_path, n_ctx=256, verbose=False, kv_eviction="snapkv", kv_evict_every=4)
    with pytest.raises(ValueError, match="kv_evict_every must be >= 1, got 0"):
        Llama(model_path, n_ctx=256, verbose=False, kv_eviction="h2o", kv_evict_every=0)
