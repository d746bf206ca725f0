"""Head profiles (kvgguf.head_profile, `kvgguf profile-heads`): measured with KVzip on calibration prose of the real
model, written with gguf-py as a profile file and into a copy of the model, read back, and refused for another
model. The model's budget shares are a property of the model: two disjoint sets of calibration contexts give
the same profile (measured with 4 + 4 contexts of 1K tokens: correlation of the shares >= 0.996 at every ratio,
the same top 6 pairs of 90; with the test's 2 + 2 contexts of 384 tokens: correlation 0.989-0.999, 5 or 6 of
the top 6 shared)."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

import kvgguf
from kvgguf import prose
from kvgguf.head_profile import DEFAULT_RATIOS, HeadProfile, HeadProfileError, profile_from_scores
from kvgguf.profile_heads import context_scores
from kvtest import last_logits
from tiny_models import write_tiny_alibi_model

CONTEXT_TOKENS = 384


@pytest.fixture(scope="module")
def calibration(model_path):
    """KVzip scores of four calibration contexts, and the model's identity."""
    llm = kvgguf.Llama(model_path, n_ctx=2048, n_batch=512, n_threads=2, verbose=False, kv_eviction="kvzip",
                       kv_keep=0.5, kv_head_profile=None)
    count = lambda text: len(llm.tokenize(text.encode(), add_bos=False, special=False))  # noqa: E731
    documents = prose.documents(prose.CALIBRATION_MODULES, CONTEXT_TOKENS, count)[:4]
    scores = [context_scores(llm, document) for document in documents]
    identity = llm.model_identity()
    n_cells = len(llm.tokenize(documents[0].encode(), add_bos=False, special=False))
    llm.close()
    return scores, identity, n_cells


@pytest.fixture(scope="module")
def profile(calibration) -> HeadProfile:
    scores, identity, _ = calibration
    return profile_from_scores(scores, DEFAULT_RATIOS, identity, {"test": True})


def test_scores_cover_the_evictable_cells(calibration):
    scores, identity, n_tokens = calibration
    assert scores[0].shape[:2] == (identity.n_layer, identity.n_head_kv)
    # the document's tokens less the protected window at its end (the template's head is not among them)
    assert scores[0].shape[2] == n_tokens - kvgguf.settings.DEFAULT_WINDOW
    assert np.all(scores[0] >= 0) and np.all(scores[0] <= 1) and scores[0].max() > 0.5


def test_shares_are_the_global_selection_and_a_property_of_the_model(calibration, profile):
    scores, identity, _ = calibration
    assert np.allclose(profile.shares.sum(axis=(1, 2)), 1.0, atol=1e-5)
    # a global top-10% selection is far from equal per head: a few pairs take most of it
    top6 = np.sort(profile.shares[list(profile.ratios).index(np.float32(0.1))].ravel())[::-1][:6].sum()
    assert top6 > 0.3, top6
    first, second = (profile_from_scores(half, DEFAULT_RATIOS, identity, {}) for half in (scores[:2], scores[2:]))
    for i, ratio in enumerate(profile.ratios):
        a, b = first.shares[i].ravel(), second.shares[i].ravel()
        assert np.corrcoef(a, b)[0, 1] > 0.95, ratio
        assert set(np.argsort(-a)[:6]) <= set(np.argsort(-b)[:12]), ratio
    # the reference's head score: a pair's largest cell score over the contexts
    assert np.allclose(profile.head_scores, np.max([s.max(axis=2) for s in scores], axis=0))
    assert profile.head_scores.ravel()[profile.ranking[0]] == profile.head_scores.max()


def test_budgets_follow_the_shares_capped_at_the_cells(profile):
    n_cells = 1000
    for keep in (0.05, 0.1, 0.25, 0.5, 0.9):
        budgets = profile.budgets(keep, n_cells)
        assert budgets.sum() == int(np.ceil(keep * profile.n_pairs * n_cells))
        assert budgets.min() >= 0 and budgets.max() <= n_cells
        shares = profile.shares_at(keep).ravel()
        uncapped = budgets.ravel() < n_cells
        # uncapped pairs are in proportion to their shares (within rounding)
        scale = budgets.ravel()[uncapped].sum() / shares[uncapped].sum()
        assert np.all(np.abs(budgets.ravel()[uncapped] - shares[uncapped] * scale) <= 1.0 + 1e-6)
    assert np.all(profile.budgets(1.0, n_cells) == n_cells)
    # the interpolation lands on the profiled ratios
    assert np.allclose(profile.shares_at(float(profile.ratios[2])), profile.shares[2], atol=1e-6)
    with pytest.raises(ValueError, match="keep must be in"):
        profile.budgets(0.0, n_cells)


def test_profile_file_and_model_copy_round_trip(model_path, profile, tmp_path):
    path = profile.save(tmp_path / "model.profile.gguf")
    for loaded in (HeadProfile.load(path),
                   HeadProfile.load(profile.save_into_model(model_path, tmp_path / "model-with-profile.gguf"))):
        assert np.array_equal(loaded.shares, profile.shares) and np.array_equal(loaded.ratios, profile.ratios)
        assert np.array_equal(loaded.ranking, profile.ranking)
        assert np.array_equal(loaded.head_scores, profile.head_scores)
        assert loaded.base.fingerprint == profile.base.fingerprint and loaded.calibration == {"test": True}
    # the copy is still the model: llama.cpp loads it and gives the same logits
    prompt = "The lighthouse keeper wrote every evening about"
    logits = []
    for gguf_path in (model_path, str(tmp_path / "model-with-profile.gguf")):
        llm = kvgguf.Llama(gguf_path, n_ctx=256, n_threads=2, verbose=False)
        llm.eval(llm.tokenize(prompt.encode()))
        logits.append(last_logits(llm))
        llm.close()
    assert np.array_equal(logits[0], logits[1])


def test_another_models_profile_is_refused_by_name(model_path, profile, tmp_path):
    llm = kvgguf.Llama(model_path, n_ctx=256, n_threads=1, verbose=False)
    profile.check_model(llm.model_identity())
    llm.close()
    tiny = kvgguf.Llama(write_tiny_alibi_model(tmp_path / "tiny-mpt.gguf"), n_ctx=64, n_threads=1, verbose=False)
    with pytest.raises(HeadProfileError, match=f"measured on '{profile.base.name}'.*does not fit"):
        profile.check_model(tiny.model_identity())
    tiny.close()
    # the same shapes in another file are refused too
    other = dataclasses.replace(profile.base, fingerprint="0" * 64)
    with pytest.raises(HeadProfileError, match="model file differs"):
        profile.check_model(other)


def test_files_without_a_profile_are_refused_clearly(model_path, profile, tmp_path):
    with pytest.raises(HeadProfileError, match="holds no head profile"):
        HeadProfile.load(model_path)
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("not a GGUF file")
    with pytest.raises(HeadProfileError, match="not a readable GGUF file"):
        HeadProfile.load(not_gguf)
    with pytest.raises(ValueError, match="not over"):
        profile.save_into_model(model_path, model_path)


def test_cli_rejects_bad_ratios_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "kvgguf", "profile-heads", "-o", str(tmp_path / "p.gguf"),
                          "--ratios", "0.2,1.5"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "--ratios must be distinct kept ratios in (0, 1), got '0.2,1.5'" in run.stderr
    assert "Traceback" not in run.stderr


def test_tiers_group_budgets_optimally(profile):
    import itertools

    from kvgguf.head_profile import group_into_tiers

    budgets = profile.budgets(0.1, 1000)
    one = group_into_tiers(budgets, 1)
    assert one.levels.tolist() == [round(budgets.mean())] and np.all(one.tier_of == 0)
    for n_tiers in (2, 3, 4):
        tiers = group_into_tiers(budgets, n_tiers)
        assert tiers.levels.size == n_tiers and np.all(np.diff(tiers.levels) < 0)
        assert abs(int(tiers.budgets().sum()) - int(budgets.sum())) <= budgets.size / 2
        assert set(np.unique(tiers.tier_of)) == set(range(n_tiers))
    # as many tiers as distinct budgets: every pair keeps its own budget
    exact = group_into_tiers(np.array([[7, 300, 7], [300, 40, 7]]), 3)
    assert exact.budgets().tolist() == [[7, 300, 7], [300, 40, 7]]
    # the least squared change, against every split of a small sorted example into three groups
    values = np.array([900, 610, 600, 130, 120, 100, 12, 10, 3, 1], dtype=np.float64)
    best = min(sum(((g - g.mean()) ** 2).sum() for g in np.split(values, cuts))
               for cuts in itertools.combinations(range(1, values.size), 2))
    tiers = group_into_tiers(values.astype(np.int64), 3)
    means = {t: values[tiers.tier_of == t].mean() for t in range(3)}
    assert np.isclose(sum(((values[tiers.tier_of == t] - means[t]) ** 2).sum() for t in range(3)), best)
    with pytest.raises(ValueError, match="n_tiers must be >= 1"):
        group_into_tiers(budgets, 0)
