"""The attention tap against llama.cpp's own softmax (kq_soft_max captured with cb_eval, flash attention off)."""
from __future__ import annotations

import numpy as np
import pytest

from kvgguf.text import haystack
from kvtest import GGML_TYPE_F16, GGML_TYPE_Q8_0, RawContext, SoftMaxCapture
from kvgguf._native import NativeError
from kvgguf.tap import AttentionTap

N_PROMPT = 300
N_UBATCH = 128           # the observer rows span three ubatches
P0, P1 = 100, N_PROMPT   # observer queries


def reference_scores(capture: SoftMaxCapture, positions: list[int], n_head_kv: int, n_cells: int,
                     reduce_rows: str, reduce_heads: str) -> np.ndarray:
    """The tap's definition, computed from the captured probabilities: rows -> query heads -> KV groups."""
    n_layer = max(capture.calls[0]) + 1
    n_head = capture.calls[0][0].shape[0]
    acc = np.zeros((n_layer, n_head, n_cells))
    start = 0
    rows_total = 0
    for call in capture.calls:
        if not call:
            continue
        n_tok = call[0].shape[1]
        pos = np.asarray(positions[start:start + n_tok])
        rows = np.nonzero((pos >= P0) & (pos < P1))[0]
        start += n_tok
        if rows.size == 0:
            continue
        rows_total += rows.size
        for il, probs in call.items():
            sel = probs[:, rows, :n_cells]  # cells beyond the window were never attended
            n_kv = min(probs.shape[2], n_cells)
            if reduce_rows == "max":
                acc[il, :, :n_kv] = np.maximum(acc[il, :, :n_kv], sel.max(axis=1))
            else:
                acc[il, :, :n_kv] += sel.sum(axis=1)
    if reduce_rows == "mean":
        acc /= rows_total
    grouped = acc.reshape(n_layer, n_head_kv, n_head // n_head_kv, n_cells)
    return grouped.max(axis=2) if reduce_heads == "max" else grouped.mean(axis=2)


@pytest.mark.parametrize("reduce_rows,reduce_heads", [("max", "max"), ("mean", "mean"), ("max", "mean")])
def test_tap_equals_llama_cpp_softmax(raw_model, reduce_rows, reduce_heads):
    tokens = raw_model.tokenize(haystack(40))[:N_PROMPT]
    capture = SoftMaxCapture()
    ctx = RawContext(raw_model, n_ctx=1024, n_ubatch=N_UBATCH, cb_eval=capture)
    try:
        tap = AttentionTap(ctx.ctx, raw_model.n_layer, raw_model.n_head_kv)
        tap.start(0, P0, P1, reduce_rows, reduce_heads)
        ctx.decode(tokens)
        assert tap.n_rows() == P1 - P0
        scores = tap.scores(0)
        assert scores.shape == (raw_model.n_layer, raw_model.n_head_kv, N_PROMPT)
        expected = reference_scores(capture, list(range(N_PROMPT)), raw_model.n_head_kv, N_PROMPT,
                                    reduce_rows, reduce_heads)
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)
        assert scores[:, :, P1 - 1:].max() > 0 and scores.max() <= 1.0 + 1e-6
        tap.stop()
    finally:
        ctx.close()


@pytest.mark.parametrize("type_k,flash_attn", [(GGML_TYPE_F16, True), (GGML_TYPE_Q8_0, True),
                                               (GGML_TYPE_Q8_0, False)], ids=["f16-fa", "q8_0-fa", "q8_0-nofa"])
def test_tap_with_flash_attention_and_quantized_k(raw_model, type_k, flash_attn):
    """Flash attention never materializes probabilities; the tap still gives them (vs the f16 non-FA tap)."""
    tokens = raw_model.tokenize(haystack(40))[:N_PROMPT]

    def tapped(**config) -> np.ndarray:
        ctx = RawContext(raw_model, n_ctx=1024, n_ubatch=N_UBATCH, **config)
        try:
            tap = AttentionTap(ctx.ctx, raw_model.n_layer, raw_model.n_head_kv)
            tap.start(0, P0, P1, "mean", "max")
            ctx.decode(tokens)
            return tap.scores(0)
        finally:
            ctx.close()

    reference = tapped(type_k=GGML_TYPE_F16, flash_attn=False)
    scores = tapped(type_k=type_k, type_v=type_k if flash_attn else GGML_TYPE_F16, flash_attn=flash_attn)
    # the K/V themselves differ slightly (f16 flash accumulation, q8_0 rounding): compare the rankings
    assert np.abs(scores - reference).max() < 0.05
    for il in range(raw_model.n_layer):
        for h in range(raw_model.n_head_kv):
            top_ref = set(np.argsort(-reference[il, h])[:30])
            top = set(np.argsort(-scores[il, h])[:30])
            assert len(top_ref & top) >= 24, (il, h)


class NodeNames:
    """cb_eval that records the names of all graph nodes (asked once per node) and requests none."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def __call__(self, tensor: int, ask: bool, user_data) -> bool:
        from kvtest import _libggml_base

        self.names.add(_libggml_base.ggml_get_name(tensor).decode())
        return False


def test_tap_adds_nodes_only_when_on_and_changes_no_logits(raw_model):
    tokens = raw_model.tokenize(haystack(10))[:60]
    off_nodes, on_nodes = NodeNames(), NodeNames()
    off = RawContext(raw_model, n_ctx=512, cb_eval=off_nodes)
    on = RawContext(raw_model, n_ctx=512, cb_eval=on_nodes)
    try:
        off_logits = off.decode(tokens)
        assert off_nodes.names and not any(name.startswith("attn_tap") for name in off_nodes.names)
        tap = AttentionTap(on.ctx, raw_model.n_layer, raw_model.n_head_kv)
        tap.start(0, 50, 60)
        on_logits = on.decode(tokens)
        assert f"attn_tap-{raw_model.n_layer - 1}" in on_nodes.names
        assert tap.n_rows() == 10
        assert np.array_equal(on_logits, off_logits)  # the tap observes; it does not change the computation
        on.decode([tokens[0]], positions=[60])        # outside [50, 60): no rows added
        assert tap.n_rows() == 10
        tap.stop()
    finally:
        off.close()
        on.close()


def test_tap_bad_requests_fail(raw_model):
    ctx = RawContext(raw_model, n_ctx=512)
    try:
        tap = AttentionTap(ctx.ctx, raw_model.n_layer, raw_model.n_head_kv)
        with pytest.raises(ValueError, match="reduce_rows"):
            tap.start(0, 0, 10, "median")
        with pytest.raises(NativeError, match="sequence id"):
            tap.start(3, 0, 10)
        with pytest.raises(NativeError, match="invalid argument"):
            tap.start(0, 10, 5)
        with pytest.raises(NativeError):
            tap.scores(0)                      # not running
        tap.start(0, 0, 10)
        tap.stop()
        with pytest.raises(NativeError):
            tap.scores(0)
    finally:
        ctx.close()


def graphs_reused(ctx) -> int:
    from kvgguf._native import llama_cpp_api

    return llama_cpp_api.llama_perf_context(ctx).n_reused


N_STEPS = 12


def reference_step(capture: SoftMaxCapture, position: int, n_head_kv: int, reduce_heads: str) -> np.ndarray:
    """One decoded token's probabilities over the position + 1 cells, per (layer, KV group)."""
    (call,) = [call for call in capture.calls if call]
    n_layer = max(call) + 1
    probs = np.stack([call[il][:, 0, :position + 1] for il in range(n_layer)])  # [n_layer, n_head, n_cells]
    grouped = probs.reshape(n_layer, n_head_kv, -1, position + 1)
    return grouped.max(axis=2) if reduce_heads == "max" else grouped.mean(axis=2)


@pytest.mark.parametrize("reduce_rows,reduce_heads", [("max", "max"), ("mean", "mean"), ("mean", "max")],
                         ids=["heads-in-graph-max", "heads-in-graph-mean", "heads-on-read"])
def test_tap_around_every_decode_step(raw_model, reduce_rows, reduce_heads):
    """Decode-time policies start the tap around each decode step: each step's scores are that token's softmax,
    and one step's graph is reused at the next (the observers are row 0 every time) while the tap is on."""
    tokens = raw_model.tokenize(haystack(12))[:N_STEPS + 80]
    capture = SoftMaxCapture()
    ctx = RawContext(raw_model, n_ctx=512, cb_eval=capture)
    try:
        ctx.decode(tokens[:80])
        tap = AttentionTap(ctx.ctx, raw_model.n_layer, raw_model.n_head_kv)
        reused_before = graphs_reused(ctx.ctx)
        for step, token in enumerate(tokens[80:]):
            position = 80 + step
            capture.calls = [{}]
            tap.start(0, position, position + 1, reduce_rows, reduce_heads)
            ctx.decode([token], positions=[position])
            assert tap.n_rows() == 1
            scores = tap.scores(0)
            tap.stop()
            expected = reference_step(capture, position, raw_model.n_head_kv, reduce_heads)
            np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
            assert abs(scores.sum(axis=2) - 1.0).max() < 1e-3 or reduce_heads == "max"
        # the first step builds the graph with the tap; KV cells grow past a padding boundary at most once here
        assert graphs_reused(ctx.ctx) - reused_before >= N_STEPS - 2
    finally:
        ctx.close()

