"""KVzip on the real model: the context is compressed before the question is known, by how much the model needs
each cell to repeat the context; the reconstruction's own cells are gone afterwards.

The answers are checked over SEEDS (generated niah_single samples of 2K tokens, keep 0.2, query-agnostic), not on
one sample. Measured on seeds 0-7 (n = 8): KVzip answered 8/8 per KV head and 8/8 per token, SnapKV at the same
budget 0/8 (it scores with the context's last tokens, which say nothing about the needle). Asserted over the 3
seeds here: KVzip at least 2 of 3 at either granularity, SnapKV at most 1 of 3 (one flip either way, e.g. from
another host's rounding, does not fail the test; a broken selection does).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

from kvgguf.bench import accuracy
from kvgguf.bench.tasks import Sample, generate, score

KEEP = 0.2
SEEDS = (0, 1, 2)
KVZIP_AT_LEAST = 2   # of 3 (measured 8/8)
SNAPKV_AT_MOST = 1   # of 3 (measured 0/8)


@dataclass
class Answered:
    """One sample answered after a query-agnostic compression: what the cache and the policy held."""

    sample: Sample
    tokens: accuracy.PromptTokens
    output: str
    stats: dict
    positions: np.ndarray
    scores: dict
    n_tokens: int


@pytest.fixture(scope="module")
def llm(llm_4k):
    return llm_4k


@pytest.fixture(scope="module")
def samples(llm) -> list[tuple[Sample, accuracy.PromptTokens]]:
    count = lambda text: len(llm.tokenize(text.encode(), add_bos=False))  # noqa: E731
    return [(sample, accuracy.split_prompt(llm, llm.chat_formatter(), sample))
            for sample in (generate("niah_single", 2048, seed, count) for seed in SEEDS)]


@pytest.fixture(scope="module")
def answers(llm, samples):
    """Each (policy, granularity)'s answers over the samples, computed once for the tests that look at them."""
    done: dict[tuple[str, str | None], list[Answered]] = {}

    def get(policy: str, granularity: str | None) -> list[Answered]:
        if (policy, granularity) not in done:
            runs = []
            for sample, tokens in samples:
                llm.configure_kv_eviction(policy, kv_keep=KEEP, kv_granularity=granularity, kv_head_profile=None)
                output = accuracy.answer(llm, tokens, "query-agnostic", max_tokens=32)   # compress, then ask
                runs.append(Answered(sample, tokens, output, llm.kv_stats(), llm.kv_positions().copy(),
                                     llm.kv_scores(), llm.n_tokens))
            done[(policy, granularity)] = runs
        return done[(policy, granularity)]

    return get


def template_head(llm) -> list[int]:
    """The chat template's tokens before a user turn's content: KVzip protects them and reconstructs only the
    context after them (as kvpress's reference does)."""
    prompt = llm.chat_formatter()(messages=[{"role": "user", "content": "\x00"}]).prompt
    return llm.tokenize(prompt[:prompt.index("\x00")].encode(), add_bos=False, special=True)


@pytest.mark.parametrize("granularity", ["head", "token"])
def test_kvzip_keeps_the_needle_before_the_question_is_known(llm, answers, granularity):
    head = template_head(llm)
    runs = answers("kvzip", granularity)
    for run in runs:
        n_context = len(run.tokens.context)
        assert len(head) > llm.kv_settings.sink and run.tokens.context[:len(head)] == head
        protected = dataclasses.replace(llm.kv_settings, sink=len(head))  # the sinks and the template's head
        target = protected.target_cells(n_context)
        assert run.stats["history"][-1]["granularity"] == granularity
        assert run.stats["cells_before"] == n_context and run.stats["cells_after"] == target
        # the reconstruction's cells are gone: the cache holds the kept context cells, then the question and answer
        assert (run.positions < n_context).sum() == target
        assert run.positions[:len(head)].tolist() == list(range(len(head)))
        assert run.positions[run.positions >= n_context].tolist() == list(range(n_context, run.n_tokens))
        assert run.scores["scores"].shape == (30, 3, n_context)
    right = [score(run.sample, run.output) for run in runs]
    assert sum(right) >= KVZIP_AT_LEAST, [run.output for run in runs]


def test_snapkv_at_the_same_budget_loses_it(llm, answers):
    runs = answers("snapkv", None)
    for run in runs:   # the eviction this relies on happened, to the same budget
        assert run.stats["cells_after"] == llm.kv_settings.target_cells(len(run.tokens.context))
    right = [score(run.sample, run.output) for run in runs]
    assert sum(right) <= SNAPKV_AT_MOST, [run.output for run in runs]
    assert sum(right) < sum(score(run.sample, run.output) for run in answers("kvzip", "token"))


def test_needle_cells_score_high(llm, answers):
    """The needle's tokens rank in the top of KVzip's per-cell scores (max over layers and heads): on every sample
    in the top 10% (measured on seeds 0-7: at most 0.47%), where the budget keeps 20%."""
    for run in answers("kvzip", "token"):
        per_cell = run.scores["scores"].max(axis=(0, 1))
        needle_ids = llm.tokenize(f" {run.sample.answers[0]}".encode(), add_bos=False)
        context = np.array(run.tokens.context)
        hits = [i for i in range(len(context) - len(needle_ids))
                if context[i:i + len(needle_ids)].tolist() == needle_ids]
        assert hits, "the needle's number is in the context"
        needle_rank = (per_cell > per_cell[hits[0]:hits[0] + len(needle_ids)].max()).mean()
        assert needle_rank < KEEP / 2, (run.sample.seed, needle_rank)


def test_a_prompt_continued_after_a_snapshot_is_compressed_as_one_prefill(llm, samples, answers):
    """The template head is read off the whole prompt, also when its start was decoded without eviction and
    restored from a snapshot (what bench accuracy does to share a sample's prefix between configurations): it is
    protected and not reconstructed, so the cells kept, their scores and the answer are those of one prefill."""
    sample, tokens = samples[0]
    one_prefill = answers("kvzip", "token")[0]
    head = template_head(llm)
    prefix = accuracy.shared_prefix(llm, tokens, window=32)  # eviction off, snapshot after all but 32 tokens
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_granularity="token", kv_head_profile=None)
    output = accuracy.answer(llm, tokens, "query-agnostic", max_tokens=32, prefix=prefix)
    n_context = len(tokens.context)
    assert llm.kv_stats()["cells_after"] == dataclasses.replace(llm.kv_settings, sink=len(head)).target_cells(
        n_context)
    # the reconstruction was the same as after one prefill (the head not reconstructed), so were its scores
    np.testing.assert_allclose(llm.kv_scores()["scores"], one_prefill.scores["scores"], rtol=1e-4, atol=1e-6)
    positions = llm.kv_positions()
    kept = positions[positions < n_context]
    assert kept[:len(head)].tolist() == list(range(len(head)))
    assert kept.tolist() == one_prefill.positions[one_prefill.positions < n_context].tolist()
    assert output == one_prefill.output


def test_reconstruction_in_smaller_batches_scores_the_same(llm, samples, answers, monkeypatch):
    """On the CPU the reconstruction is decoded in batches of kvzip.BATCH_CPU tokens (its attention probabilities
    then stay in cache); the tap's max over more, smaller ubatches gives the scores of n_batch ones."""
    from kvgguf.policies import kvzip

    _, tokens = samples[0]
    small = answers("kvzip", "token")[0]
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_granularity="token", kv_head_profile=None)
    controller = llm.kv_controller
    assert controller.policy.reconstruction_batch(controller.scoring) == kvzip.BATCH_CPU < llm.n_batch
    monkeypatch.setattr(kvzip, "BATCH_CPU", llm.n_batch)
    llm.prefill(tokens.context)
    np.testing.assert_allclose(llm.kv_scores()["scores"], small.scores["scores"], rtol=1e-4, atol=1e-6)
    kept_small = small.positions[small.positions < len(tokens.context)]
    assert llm.kv_positions().tolist() == kept_small.tolist()
