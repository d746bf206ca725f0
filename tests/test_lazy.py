"""kv_eviction="lazy" (LazyEviction) and "tova" on the decode-step hook, on the real model: the per-cell state
(TS, MRI) equals a NumPy reference computed from the tap's per-step attention, the cache never holds more than
the budget + W cells while generating far past n_ctx, and bad settings are refused by name."""
from __future__ import annotations

import re

import numpy as np
import pytest

import kvgguf.policies
from kvgguf import Llama
from kvgguf.policies.lazy import LazyEvictionPolicy, importance
from kvgguf.policies.tova import TOVAPolicy
from kvgguf.text import haystack


class RecordingLazy(LazyEvictionPolicy):
    """LazyEviction that also records what the hook showed it (a test double around the real policy)."""

    name = "lazy-recorded"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []

    def observe_step(self, attention, positions, n_queries):
        self.steps.append((attention.copy(), positions.copy()))
        super().observe_step(attention, positions, n_queries)


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setitem(kvgguf.policies.POLICIES, RecordingLazy.name, RecordingLazy)
    return RecordingLazy.name


def prompt_tokens(llm: Llama, n_sentences: int) -> list[int]:
    return llm.tokenize((haystack(n_sentences, seed=6) + " Continue the story.").encode())


def generate(llm: Llama, prompt: list[int], n: int) -> int:
    """Greedy tokens after ``prompt`` (end of text suppressed); returns the most cells the cache held."""
    eos = llm.token_eos()

    def no_eos(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        logits[eos] = -np.inf
        return logits

    peak = 0
    for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, logits_processor=[no_eos])):
        peak = max(peak, llm.kv_stats()["cells_now"])
        if i + 1 == n:
            break
    return peak


def reference_state(steps: list[tuple[np.ndarray, np.ndarray]], alpha: float) -> tuple[dict, dict]:
    """TS and MRI per position from the recorded steps, by the reference code's rule, one (layer, head) array
    per position: a position is first seen at the step that decoded it (a step is a decode call, at its newest
    position: the prompt is one); at each later step t that pays it >= alpha, MRI = max(MRI, t - TS), TS = t."""
    last_seen: dict[int, np.ndarray] = {}
    recurrence: dict[int, np.ndarray] = {}
    for attention, positions in steps:
        step = int(positions.max())
        for j, position in enumerate(positions.tolist()):
            if position not in last_seen:
                last_seen[position] = np.full(attention.shape[:2], step, dtype=np.int64)
                recurrence[position] = np.zeros(attention.shape[:2], dtype=np.int64)
                continue
            attended = attention[:, :, j] >= np.float32(alpha)
            recurrence[position] = np.where(attended, np.maximum(recurrence[position], step - last_seen[position]),
                                            recurrence[position])
            last_seen[position] = np.where(attended, step, last_seen[position])
    return last_seen, recurrence


def test_lazy_state_follows_the_paper_through_evictions(model_path, recording):
    """Over 100 generated tokens with the cache brought back to 96 cells every 16 tokens (W = 16, per token so
    that every head holds the same positions), the TS and MRI of every cell the cache holds equal the NumPy
    reference from what the tap showed at each step, exactly, and the cache never held more than 96 + 16."""
    budget, window, alpha = 96, 16, 1e-3
    llm = Llama(model_path, n_ctx=512, n_threads=2, verbose=False, kv_eviction=recording, kv_budget=budget,
                kv_lazy_window=window, kv_lazy_alpha=alpha, kv_granularity="token")
    try:
        prompt = prompt_tokens(llm, 4)
        assert len(prompt) < budget  # the prompt is kept whole, then becomes evictable
        peak = generate(llm, prompt, 100)
        policy = llm.kv_controller.policy
        history = llm.kv_stats()["history"]
        positions = llm.kv_positions()
        scores = llm.kv_scores()
    finally:
        llm.close()
    assert len(history) >= 4 and all(h["cells_after"] == budget for h in history)
    assert peak <= budget + window
    last_seen, recurrence = reference_state(policy.steps, alpha)
    np.testing.assert_array_equal(policy.last_seen.values, np.stack([last_seen[p] for p in positions], axis=-1))
    np.testing.assert_array_equal(policy.recurrence.values, np.stack([recurrence[p] for p in positions], axis=-1))
    assert (policy.recurrence.values > 0).any()  # attention did come back to some cells
    # the last eviction ranked by I = H1 + H2 of that state (its scores cover the cells it saw then)
    assert scores["scores"].shape == (30, 3, scores["positions"].size)
    assert np.all(np.isfinite(scores["scores"])) and scores["scores"].max() <= 2.0 + 1e-6


def test_importance_is_the_reference_codes_form():
    last_seen = np.array([10, 10, 90, 50])
    recurrence = np.array([0, 40, 5, 1])
    got = importance(100, last_seen, recurrence)
    with np.errstate(over="ignore"):
        h1 = 2 / (1 + np.exp(1 + (100 - last_seen) / (recurrence + 1e-5)))
    h2 = np.array([0.0, 2 / (1 + np.exp(39)), 2 / (1 + np.exp(4)), 1.0])
    np.testing.assert_allclose(got, h1 + h2, rtol=1e-6)
    # a short recurrence interval first (H2), then recent attention for its interval (H1); never recurred: last
    assert got[3] > got[2] > got[1] > got[0]


@pytest.mark.parametrize("policy, extra", [("lazy", dict(kv_lazy_window=32)), ("tova", {}), ("h2o", {}),
                                           ("streaming", dict(kv_evict_every=8))])
def test_generation_runs_far_past_n_ctx_in_bounded_memory(model_path, policy, extra):
    """1024 generated tokens (4 x n_ctx) after a short prompt: the cache never holds more than the budget plus
    the window between two evictions, and positions run on."""
    budget = 128
    llm = Llama(model_path, n_ctx=256, n_threads=2, verbose=False, kv_eviction=policy, kv_budget=budget, **extra)
    try:
        prompt = prompt_tokens(llm, 2)
        peak = generate(llm, prompt, 1024)
        positions = llm.kv_positions()
        assert llm.n_tokens == len(prompt) + 1023  # the last token sampled is not decoded yet
        assert positions[-1] == llm.n_tokens - 1 and np.unique(positions).size == positions.size
        assert peak <= budget + llm.kv_settings.evict_every
        assert llm.kv_stats()["evictions"] >= 1024 // (2 * llm.kv_settings.evict_every)
    finally:
        llm.close()


def test_tova_ranks_by_the_newest_tokens_attention(model_path, monkeypatch):
    """TOVA's scores at an eviction are the attention the newest decoded token paid the cells."""
    shown: list[np.ndarray] = []

    class RecordingTOVA(TOVAPolicy):
        name = "tova-recorded"

        def observe_step(self, attention, positions, n_queries):
            shown.append(attention.copy())
            super().observe_step(attention, positions, n_queries)

    monkeypatch.setitem(kvgguf.policies.POLICIES, RecordingTOVA.name, RecordingTOVA)
    llm = Llama(model_path, n_ctx=512, n_threads=2, verbose=False, kv_eviction=RecordingTOVA.name, kv_budget=64,
                kv_granularity="head", kv_evict_every=1000)
    try:
        prompt = prompt_tokens(llm, 8)
        assert len(prompt) > 64
        llm.eval(prompt)  # a plain eval: no prompt eviction, the cache holds the prompt
        llm.kv_controller.evict_to(64)
        scores = llm.kv_scores()["scores"]
    finally:
        llm.close()
    np.testing.assert_array_equal(scores, shown[-1])


def test_bad_lazy_settings_are_refused_by_name(model_path):
    llm = Llama(model_path, n_ctx=256, n_threads=2, verbose=False, kv_eviction="lazy", kv_budget=100,
                kv_lazy_window=16)
    try:
        for arguments, message in (
                (dict(kv_lazy_window=0), "kv_lazy_window must be >= 1, got 0"),
                (dict(kv_lazy_alpha=1.0), "kv_lazy_alpha must be a probability in (0, 1), got 1.0"),
                (dict(kv_lazy_alpha=0), "kv_lazy_alpha must be a probability"),
                (dict(kv_lazy_window=64, kv_budget=60), "kv_budget=60 must exceed the protected cells"),
                (dict(kv_lazy_window=16, kv_window=8), "kv_lazy_window=16 and kv_window=8 differ"),
                (dict(kv_evict_every=4), "evicts every kv_lazy_window tokens"),
        ):
            with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
                llm.configure_kv_eviction("lazy", **{"kv_budget": 100, **arguments})
        with pytest.raises(ValueError, match="kv_lazy_window needs a policy that evicts lazily by recurrence"):
            llm.configure_kv_eviction("h2o", kv_budget=100, kv_lazy_window=16)
        # the model and its settings stay usable
        assert llm.kv_settings.policy_name == "lazy" and llm.kv_settings.window == 16
        out = llm.create_completion("The lighthouse keeper", max_tokens=4, temperature=0)
        assert out["usage"]["completion_tokens"] == 4
    finally:
        llm.close()


def test_the_calibrated_window_bounds_the_budget_at_construction(model_path):
    """A budget below the generic window (128) but above the model's calibrated one (26 + 4 sinks) is accepted by
    the constructor, as by configure_kv_eviction; below the calibrated one it is refused by name."""
    llm = Llama(model_path, n_ctx=256, n_threads=1, verbose=False, kv_eviction="lazy", kv_budget=64)
    try:
        assert llm.kv_settings.window == 26 and llm.kv_settings.budget == 64
    finally:
        llm.close()
    with pytest.raises(ValueError, match="kv_budget=30 must exceed the protected cells kv_sink \\+ kv_window = 30"):
        Llama(model_path, n_ctx=256, verbose=False, kv_eviction="lazy", kv_budget=30)


def test_completions_run_past_n_ctx_as_without_eviction(model_path):
    """create_completion with max_tokens beyond n_ctx: 600 tokens in a 256-cell cache, streamed or not, the same
    text; a stop sequence cuts it as without eviction. (Without a policy llama-cpp-python stops at n_ctx.)"""
    llm = Llama(model_path, n_ctx=256, n_threads=2, verbose=False, kv_eviction="lazy", kv_budget=128,
                kv_lazy_window=32)
    try:
        arguments = dict(max_tokens=600, temperature=0, repeat_penalty=1.0, logit_bias={llm.token_eos(): -100.0})
        prompt = "Write a very long story about a lighthouse keeper."
        out = llm.create_completion(prompt, **arguments)
        assert out["usage"]["completion_tokens"] == 600 and out["choices"][0]["finish_reason"] == "length"
        assert llm.kv_stats()["cells_now"] <= 128 + 32
        text = out["choices"][0]["text"]
        streamed = "".join(chunk["choices"][0]["text"] for chunk in llm.create_completion(prompt, stream=True,
                                                                                          **arguments))
        assert streamed == text
        stop = text[len(text) // 2:][:12]  # a stretch of the second half (its first occurrence ends the text)
        cut = llm.create_completion(prompt, stop=[stop], **arguments)
        assert cut["choices"][0]["finish_reason"] == "stop" and cut["choices"][0]["text"] == text[:text.index(stop)]
    finally:
        llm.close()


def test_calibrate_lazy_picks_the_window_covering_80_percent(tmp_path, model_path, monkeypatch):
    """`kvgguf calibrate-lazy` on two word problems, 48-token answers: W is the 80% quantile of the MRIs the
    policy measured; shipped for the model file, it becomes that model's default kv_lazy_window / alpha."""
    import json

    import kvgguf.calibrate_lazy as calibrate_lazy
    from kvgguf.cli import main

    out = tmp_path / "windows" / "model.json"
    assert main(["calibrate-lazy", "-m", model_path, "--prompts", "2", "--max-tokens", "48", "--alpha", "5e-4",
                 "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    quantiles = [result["mri_quantiles"][q] for q in ("0.50", "0.80", "0.90", "0.95", "0.99")]
    assert quantiles == sorted(quantiles) and result["window"] == max(1, int(np.ceil(quantiles[1])))
    assert result["alpha"] == 5e-4 and [a["answer_tokens"] for a in result["answers"]] == [48, 48]
    assert 1 <= result["window"] <= 48 + 120  # an interval spans at most the prompt and the answer

    monkeypatch.setattr(calibrate_lazy, "SHIPPED_DIR", out.parent)
    llm = Llama(model_path, n_ctx=256, verbose=False, kv_eviction="lazy", kv_budget=200)
    try:
        assert (llm.kv_settings.window, llm.kv_settings.evict_every) == (result["window"], result["window"])
        assert llm.kv_settings.lazy_alpha == 5e-4
        llm.configure_kv_eviction("lazy", kv_budget=200, kv_lazy_window=16)  # the caller's W wins
        assert llm.kv_settings.window == 16 and llm.kv_settings.lazy_alpha == 5e-4
    finally:
        llm.close()
    assert result["architecture"] == "llama"
    # another model file of the same architecture: the family's default, unless only the file's own is asked for
    sibling = {**result, "fingerprint": "another llama model", "window": 7}
    out.write_text(json.dumps(sibling))
    assert calibrate_lazy.lazy_defaults("lazy", model_path, None, None, None) == (7, 5e-4)
    assert calibrate_lazy.shipped_calibration(model_path, family=False) is None
    out.write_text(json.dumps({**sibling, "architecture": "qwen2"}))
    assert calibrate_lazy.lazy_defaults("lazy", model_path, None, None, None) == (None, None)
    monkeypatch.setattr(calibrate_lazy, "SHIPPED_DIR", tmp_path / "none")
    assert calibrate_lazy.lazy_defaults("lazy", model_path, None, None, None) == (None, None)


def test_calibrate_lazy_refuses_bad_arguments_by_name(tmp_path, model_path, capsys):
    from kvgguf.cli import main

    for arguments, message in ((["--coverage", "1.5"], "--coverage must be in (0, 1), got 1.5"),
                               (["--alpha", "2"], "kv_lazy_alpha must be a probability in (0, 1), got 2.0"),
                               (["--prompts", "0"], "--prompts must be >= 1, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["calibrate-lazy", "-m", model_path, "-o", str(tmp_path / "w.json"), *arguments])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w.json").exists()


@pytest.mark.parametrize("first, second, window", [("snapkv", "lazy", dict(kv_lazy_window=32)),
                                                   ("kvzip", "h2o", dict(kv_window=32))])
def test_a_prompt_policy_composes_with_a_decode_time_one(model_path, first, second, window):
    """kv_eviction="snapkv+lazy": SnapKV evicts the prompt once (the same cells, so the same first answer tokens
    as SnapKV alone until LazyEviction's first eviction), then LazyEviction follows the generation, 1024 tokens
    past a 512-cell context, in the cells SnapKV kept plus its window. The same for KVzip (which decodes to score,
    in a plain cache) and H2O (every token)."""
    llm = Llama(model_path, n_ctx=1024 if first == "kvzip" else 512, n_threads=2, verbose=False,
                kv_head_profile=None)
    every = 32 if second == "lazy" else 1
    eos = llm.token_eos()

    def greedy(n: int) -> tuple[list[int], int]:
        def no_eos(ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
            logits[eos] = -np.inf
            return logits

        tokens, peak = [], 0
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, logits_processor=[no_eos]):
            peak = max(peak, llm.kv_stats()["cells_now"])
            if len(tokens) == n:
                break
            tokens.append(token)
        return tokens, peak

    try:
        prompt = prompt_tokens(llm, 18)
        assert 300 < len(prompt) < 500
        llm.configure_kv_eviction(first, kv_keep=0.3, kv_window=32, kv_head_profile=None)
        alone, _ = greedy(32)
        kept_alone = llm.kv_stats()["cells_after"]
        llm.configure_kv_eviction(f"{first}+{second}", kv_keep=0.3, kv_head_profile=None, **window)
        settings = llm.kv_settings
        assert (settings.window, settings.evict_every) == (32, every)
        composed, peak = greedy(1024)
        stats = llm.kv_stats()
        # the same prompt eviction (the last one of the prompt's: kvzip evicts its scratch cells before)
        budget = next(h["cells_after"] for h in stats["history"] if h["cells_before"] <= len(prompt))
        assert budget == kept_alone and budget < 0.4 * len(prompt)
        assert composed[:every] == alone[:every]  # no decode-time eviction before then
        assert peak <= budget + every and stats["evictions"] >= 1024 // every - 1
        positions = llm.kv_positions()
        assert positions[-1] == llm.n_tokens - 1 == len(prompt) + 1023 and positions.size <= budget + every
        policy = llm.kv_controller.policy
        state = policy.decode.cell_states()[0]
        assert policy.decoding and state.n_cells == positions.size  # its state follows the cells
    finally:
        llm.close()


@pytest.mark.parametrize("name, message", [
    ("lazy+snapkv", "'lazy' is no prompt policy"),
    ("snapkv+kvzip", "'kvzip' does not evict while decoding"),
    ("snapkv+lazy+h2o", "unknown kv_eviction policy 'snapkv+lazy+h2o'"),
    ("snapkv+nothing", "unknown kv_eviction policy 'nothing'"),
])
def test_bad_pairs_are_refused_by_name(model_path, name, message):
    llm = Llama(model_path, n_ctx=256, verbose=False)
    try:
        with pytest.raises(ValueError, match=re.escape(message)):
            llm.configure_kv_eviction(name, kv_keep=0.5)
        assert llm.kv_settings is None and llm.create_completion("Hi", max_tokens=2)["choices"]
    finally:
        llm.close()
