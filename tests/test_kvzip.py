"""KVzip on the real model: the context is compressed before the question is known, by how much the model needs
each cell to repeat the context; the reconstruction's own cells are gone afterwards."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvgguf.bench import accuracy
from kvgguf.bench.tasks import generate, score

KEEP = 0.2


@pytest.fixture(scope="module")
def llm(llm_4k):
    return llm_4k


@pytest.fixture(scope="module")
def sample_and_tokens(llm):
    # measured at 2K tokens, keep 0.2, query-agnostic: KVzip kept the needle on seeds 0-2, SnapKV on none
    sample = generate("niah_single", 2048, 0, lambda text: len(llm.tokenize(text.encode(), add_bos=False)))
    return sample, accuracy.split_prompt(llm, llm.chat_formatter(), sample)


def template_head(llm) -> list[int]:
    """The chat template's tokens before a user turn's content: KVzip protects them and reconstructs only the
    context after them (as kvpress's reference does)."""
    prompt = llm.chat_formatter()(messages=[{"role": "user", "content": "\x00"}]).prompt
    return llm.tokenize(prompt[:prompt.index("\x00")].encode(), add_bos=False, special=True)


@pytest.mark.parametrize("granularity", ["head", "token"])
def test_kvzip_keeps_the_needle_before_the_question_is_known(llm, sample_and_tokens, granularity):
    sample, tokens = sample_and_tokens
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_granularity=granularity)
    n_evictions = len(llm.kv_stats()["history"])
    output = accuracy.answer(llm, tokens, "query-agnostic", max_tokens=32)   # compress, then ask
    n_context = len(tokens.context)
    head = template_head(llm)
    assert len(head) > llm.kv_settings.sink and tokens.context[:len(head)] == head
    protected = dataclasses.replace(llm.kv_settings, sink=len(head))  # the sinks and the template's head
    target = protected.target_cells(n_context)
    stats = llm.kv_stats()
    assert len(stats["history"]) == n_evictions + 1 and stats["history"][-1]["granularity"] == granularity
    assert stats["cells_before"] == n_context and stats["cells_after"] == target
    # the reconstruction's cells are gone: the cache holds the kept context cells, then the question and answer
    positions = llm.kv_positions()
    assert (positions < n_context).sum() == target
    assert positions[:len(head)].tolist() == list(range(len(head)))
    assert positions[positions >= n_context].tolist() == list(range(n_context, llm.n_tokens))
    assert llm.kv_scores()["scores"].shape == (30, 3, n_context)
    assert score(sample, output) == 1.0, output


def test_a_prompt_continued_after_a_snapshot_is_compressed_as_one_prefill(llm, sample_and_tokens):
    """The template head is read off the whole prompt, also when its start was decoded without eviction and
    restored from a snapshot (what bench accuracy does to share a sample's prefix between configurations): it is
    protected and not reconstructed, so the cells kept are those of one plain prefill."""
    sample, tokens = sample_and_tokens
    head = template_head(llm)
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_granularity="token")
    llm.prefill(tokens.context)
    kept_in_one, scores_in_one = llm.kv_positions().copy(), llm.kv_scores()["scores"].copy()

    prefix = accuracy.shared_prefix(llm, tokens, window=32)  # eviction off, snapshot after all but 32 tokens
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_granularity="token")
    output = accuracy.answer(llm, tokens, "query-agnostic", max_tokens=32, prefix=prefix)
    n_context = len(tokens.context)
    assert llm.kv_stats()["cells_after"] == dataclasses.replace(llm.kv_settings, sink=len(head)).target_cells(
        n_context)
    # the reconstruction was the same as after one prefill (the head not reconstructed), so were its scores
    np.testing.assert_allclose(llm.kv_scores()["scores"], scores_in_one, rtol=1e-4, atol=1e-6)
    positions = llm.kv_positions()
    kept = positions[positions < n_context]
    assert kept[:len(head)].tolist() == list(range(len(head)))
    assert kept.tolist() == kept_in_one.tolist()
    assert score(sample, output) == 1.0, output


def test_snapkv_at_the_same_budget_loses_it(llm, sample_and_tokens):
    sample, tokens = sample_and_tokens
    llm.configure_kv_eviction("snapkv", kv_keep=KEEP)
    output = accuracy.answer(llm, tokens, "query-agnostic", max_tokens=32)
    assert llm.kv_stats()["cells_after"] == llm.kv_settings.target_cells(len(tokens.context))
    assert score(sample, output) == 0.0, output


def test_needle_cell_scores_high(llm, sample_and_tokens):
    """The needle's tokens rank in the top of KVzip's per-cell scores (max over layers and heads)."""
    sample, tokens = sample_and_tokens
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_granularity="token")
    llm.prefill(tokens.context)
    scores = llm.kv_scores()
    per_cell = scores["scores"].max(axis=(0, 1))
    needle_ids = llm.tokenize(f" {sample.answers[0]}".encode(), add_bos=False)
    context = np.array(tokens.context)
    hits = [i for i in range(len(context) - len(needle_ids)) if context[i:i + len(needle_ids)].tolist() == needle_ids]
    assert hits, "the needle's number is in the context"
    needle_rank = (per_cell > per_cell[hits[0]:hits[0] + len(needle_ids)].max()).mean()
    assert needle_rank < KEEP / 2


def test_reconstruction_in_smaller_batches_scores_the_same(llm, sample_and_tokens, monkeypatch):
    """On the CPU the reconstruction is decoded in batches of kvzip.BATCH_CPU tokens (its attention
    probabilities then stay in cache); the tap's max over more, smaller ubatches gives the scores of n_batch ones."""
    from kvgguf.policies import kvzip

    _, tokens = sample_and_tokens
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_granularity="token")
    controller = llm.kv_controller
    assert controller.policy.reconstruction_batch(controller.scoring) == kvzip.BATCH_CPU < llm.n_batch
    llm.prefill(tokens.context)
    kept_small, scores_small = llm.kv_positions().copy(), llm.kv_scores()["scores"].copy()

    monkeypatch.setattr(kvzip, "BATCH_CPU", llm.n_batch)
    llm.prefill(tokens.context)
    np.testing.assert_allclose(llm.kv_scores()["scores"], scores_small, rtol=1e-4, atol=1e-6)
    assert llm.kv_positions().tolist() == kept_small.tolist()
