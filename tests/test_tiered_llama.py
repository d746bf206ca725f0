"""Policies in a tiered KV cache through kvgguf.Llama: KVzip with the model's head profile (each KV head keeps its
profiled share of the budget) and kvzip-head (the profile alone decides which heads keep the context).

The default model's profile ships with the package (docs/profiles/). Answers are checked over SEEDS of the
bench's natural-prose needle task (prose_niah, 2K tokens: a magic number in standard-library documentation),
compressed before the question is asked (n_ctx 4096). Measured on seeds 0-7 (n = 8), AMD EPYC with AVX512:

    full cache                                                   7/8
    kvzip, keep 0.2, plain cache (per token)                     2/8   (seeds 0-2: 2/3)
    kvzip, keep 0.2, with the profile in 3 tiers (the default)   6/8   (seeds 0-2: 3/3)
        ... in 4 tiers 5/8 (3/3), in 2 tiers 3/8 (1/3); each 32-33% of the bytes, holding the same 11%
    kvzip-head, keep 0.5 (50% of the bytes)                      5/8   (seeds 0-2: 2/3; at keep 0.2, 0/3)

Asserted over the 3 seeds here: at least 2 of 3 for both (one flip from another host's rounding does not fail
the test; a broken selection or a cache that lost the context does).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import kvgguf
from kvgguf.bench import accuracy
from kvgguf.bench.tasks import generate, score
from kvgguf.head_profile import HeadProfileError, shipped_profile
from kvgguf.settings import DEFAULT_TIERS

N_CTX = 4096
LENGTH = 2048
KEEP = 0.2
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def llm(model_path):
    model = kvgguf.Llama(model_path, n_ctx=N_CTX, n_batch=512, n_threads=2, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def samples(llm):
    count = lambda text: len(llm.tokenize(text.encode(), add_bos=False))  # noqa: E731
    return [(sample, accuracy.split_prompt(llm, llm.chat_formatter(), sample))
            for sample in (generate("prose_niah", LENGTH, seed, count) for seed in SEEDS)]


def plain_kv_bytes(llm) -> int:
    llm.configure_kv_eviction(None)
    return llm.kv_stats()["kv_bytes_allocated"]


def test_kvzip_with_the_profile_plans_tiers_from_it(llm, model_path):
    plain = plain_kv_bytes(llm)
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP)  # the default, "auto": the profile shipped for this model
    stats = llm.kv_stats()
    plan = llm.kv_controller.tier_plan
    assert plan is not None and 2 <= plan.layout.n_tiers <= DEFAULT_TIERS
    assert stats["tier_cells"] == list(plan.layout.n_cells)
    # the pairs the profile gives the largest budget live in the largest tier
    profile = shipped_profile(model_path)
    top = np.unravel_index(np.argmax(profile.budgets(KEEP, N_CTX)), profile.shares.shape[1:])
    assert plan.layout.tier_of_head[top] == 0
    assert stats["kv_bytes_allocated"] < 0.6 * plain
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_head_profile=None)  # no profile: the plain cache again
    assert llm.kv_controller.tier_plan is None and llm.kv_stats()["kv_bytes_allocated"] == plain


@pytest.mark.parametrize("n_tiers", [1, 4])  # one tier, and more than the default 3 (which the others use)
def test_kv_tiers_groups_the_budgets_into_that_many_tiers(llm, samples, n_tiers):
    """kv_tiers=T: the profile's budgets in T tiers (one tier: every head the same budget, in a cache of that
    size); a context is compressed into them, each tier within its cells, and an answer decoded from it."""
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_tiers=n_tiers)
    plan = llm.kv_controller.tier_plan
    assert plan is not None and plan.layout.n_tiers == n_tiers
    assert llm.kv_settings.tiers == n_tiers
    assert llm.kv_stats()["tier_cells"] == list(plan.layout.n_cells)
    sample, tokens = samples[0]
    output = accuracy.answer(llm, tokens, "query-agnostic", max_tokens=32)
    stats = llm.kv_stats()
    assert stats["evictions"] >= 1 and all(now <= cells for now, cells in
                                           zip(stats["tier_cells_now"], plan.layout.n_cells))
    assert isinstance(output, str) and output


def test_kv_tiers_is_checked_at_the_edge(llm, samples):
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_tiers=2)
    for bad, message in [(dict(kv_eviction="snapkv", kv_tiers=2), "kv_tiers needs a policy that groups"),
                         (dict(kv_eviction="kvzip-head", kv_tiers=2), "'kvzip-head' does not"),
                         (dict(kv_eviction="kvzip", kv_tiers=0), "kv_tiers must be >= 1, got 0"),
                         (dict(kv_eviction="kvzip", kv_tiers=9), "kv_tiers must be <= 8, got 9"),
                         (dict(kv_eviction="kvzip", kv_tiers=2.0), "kv_tiers must be an integer, got 2.0"),
                         (dict(kv_eviction=None, kv_tiers=2), "need a kv_eviction policy")]:
        with pytest.raises(ValueError, match=message):
            llm.configure_kv_eviction(**bad)
        assert llm.kv_settings.tiers == 2 and llm.kv_controller.tier_plan.layout.n_tiers == 2  # still in force
    sample, tokens = samples[2]
    assert accuracy.answer(llm, tokens, "query-agnostic", max_tokens=32)  # the model and cache still work


@pytest.mark.parametrize("policy,keep", [("kvzip", KEEP), ("kvzip-head", 0.5)])
def test_compressed_in_tiers_before_the_question(llm, samples, policy, keep):
    """Each tier holds at most its cells, evicted per piece of the prompt; the answers are right."""
    llm.configure_kv_eviction(policy, kv_keep=keep, kv_head_profile="auto")
    plan = llm.kv_controller.tier_plan
    right = []
    for sample, tokens in samples:
        output = accuracy.answer(llm, tokens, "query-agnostic", max_tokens=32)
        stats = llm.kv_stats()
        assert stats["evictions"] >= 1
        assert all(now <= cells for now, cells in zip(stats["tier_cells_now"], plan.layout.n_cells))
        # the context did not fit the small tiers: they were evicted, the largest one kept more
        assert min(stats["tier_cells_now"]) < len(tokens.context) // 2
        right.append(score(sample, output))
    assert sum(right) >= 2, right


def test_a_tiered_context_answers_from_its_file_and_the_plain_cache_comes_back(llm, samples, tmp_path):
    """compress() with kvzip and the profile while the Llama's own settings use a plain cache: the context keeps
    its tiers through its file, answering from it switches the cache to them, and the next prompt gets the
    plain cache back. (Whether such answers are right is test_compressed_in_tiers_before_the_question's claim,
    over SEEDS; here the answer from the file must equal the one from memory.)"""
    llm.configure_kv_eviction("snapkv", kv_keep=0.5, kv_head_profile="auto")  # snapkv: no profile, plain
    assert llm.kv_controller.tier_plan is None
    sample, tokens = samples[0]
    before = llm.kv_stats()
    context = llm.compress(sample.context, keep=KEEP, policy="kvzip")
    assert context.tiers is not None and llm.kv_controller.tier_plan is None
    # the counters run over the model's life, through the switch to the tiers and back
    counted = llm.kv_stats()
    assert counted["evictions"] > before["evictions"] and counted["bytes_freed"] > before["bytes_freed"]
    first = llm.ask(context, sample.question, max_tokens=32)
    assert first.strip()
    stats = llm.kv_stats()
    assert stats["tier_cells"] == list(context.tiers.layout.n_cells)
    assert stats["evictions"] == counted["evictions"] and stats["bytes_freed"] == counted["bytes_freed"]
    assert min(stats["tier_cells_now"]) < len(tokens.context) // 2  # the small tiers' cells are gone
    # kept_ratio is the K/V kept, not the union of the tiers' tokens (which is nearly every token)
    assert context.n_cells > 0.9 * context.n_tokens
    answer_cells = llm.n_tokens - context.n_tokens   # the question and answer: a cell in every tier each
    held = stats["kv_bytes_now"] / stats["bytes_per_cell"] - answer_cells
    assert context.kept_ratio == pytest.approx(held / context.n_tokens, rel=1e-9)
    assert context.kept_ratio < 2 * KEEP
    loaded = llm.load_context(context.save(tmp_path / "tiered.kvc"))
    assert loaded.tiers.layout.n_cells == context.tiers.layout.n_cells
    assert np.array_equal(loaded.tiers.layout.tier_of_head, context.tiers.layout.tier_of_head)
    assert np.array_equal(loaded.positions, context.positions)
    assert loaded.kept_ratio == context.kept_ratio
    assert llm.ask(loaded, sample.question, max_tokens=32) == first
    llm.create_completion("Hello", max_tokens=2)
    assert llm.kv_controller.tier_plan is None and "tier_cells" not in llm.kv_stats()
    assert llm.kv_stats()["evictions"] == counted["evictions"]


def test_snapshot_of_a_tiered_cache_restores_its_per_head_tokens(llm, samples):
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_head_profile="auto")
    sample, tokens = samples[1]
    llm.prefill(tokens.context)
    positions = llm.kv_positions().copy()
    snapshot = llm.kv_snapshot()
    assert any(layout is not None for layout in snapshot.head_positions)  # some tier holds head-mixed cells
    expected = next(llm.generate(tokens.question, reset=False, temp=0.0, top_k=1))
    llm.reset()
    llm.kv_restore(snapshot)
    assert np.array_equal(llm.kv_positions(), positions)
    assert next(llm.generate(tokens.question, reset=False, temp=0.0, top_k=1)) == expected
    with pytest.raises(ValueError, match="head-mixed|per-head"):
        llm.kv_shift(5, 0, len(tokens.context))
    # more prompt after the compression: the tiers that now hold head-mixed cells are evicted again
    evictions = llm.kv_stats()["evictions"]
    llm.prefill(samples[2][1].context[:900], reset=False)
    stats = llm.kv_stats()
    assert stats["evictions"] > evictions
    assert all(now <= cells for now, cells in zip(stats["tier_cells_now"], stats["tier_cells"]))
    assert next(llm.generate(tokens.question, reset=False, temp=0.0, top_k=1)) >= 0


def test_profile_settings_are_checked_at_the_edge(llm, model_path, tmp_path):
    llm.configure_kv_eviction("kvzip", kv_keep=KEEP, kv_head_profile="auto")
    with pytest.raises(ValueError, match="kvzip-head.*needs a head profile"):
        llm.configure_kv_eviction("kvzip-head", kv_keep=0.5, kv_head_profile=None)
    with pytest.raises(ValueError, match="kv_head_profile='nowhere.gguf' is not a file"):
        llm.configure_kv_eviction("kvzip", kv_head_profile="nowhere.gguf")
    profile = shipped_profile(model_path)
    other = dataclasses.replace(profile, base=dataclasses.replace(profile.base, fingerprint="0" * 64))
    with pytest.raises(HeadProfileError, match="model file differs"):
        llm.configure_kv_eviction("kvzip", kv_head_profile=other.save(tmp_path / "other.profile.gguf"))
    # the settings before stay in force, and work
    assert llm.kv_settings.policy_name == "kvzip" and llm.kv_controller.tier_plan is not None
    assert llm.create_completion("The capital of France is", max_tokens=3)["choices"][0]["text"]
