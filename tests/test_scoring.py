"""The scoring context on the real model: scratch decodes of tokens or embeddings after the context, with the tap
on, a LoRA adapter switched on for one decode only, or a scratch sequence; afterwards the sequence is as it was
(cells, state bytes, logits, n_tokens, input_ids)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from kvgguf import Llama, LoraAdapter, ScoringContext, TapSpec
from kvgguf._native import llama_cpp_api as C
from kvgguf.tap import AttentionTap
from kvgguf.text import haystack
from kvtest import RawContext, RawHost, last_logits, token_embeddings, write_lora_adapter

SCORES = TapSpec(rows="max", heads="max")


@pytest.fixture(scope="module")
def llm(model_path):
    model = Llama(model_path, n_ctx=1024, n_batch=256, n_threads=2, verbose=False)
    yield model
    model.close()


@pytest.fixture
def context(llm):
    """The sequence holds 300 tokens; its last one was decoded alone (so its logits come from a one-token
    decode, as after finish())."""
    tokens = llm.tokenize(haystack(40, seed=2).encode())[:300]
    llm.reset()
    llm.eval(tokens[:-1])
    llm.eval(tokens[-1:])
    return tokens


def scratch(llm) -> list[int]:
    return llm.tokenize(b" Repeat the previous context exactly. The old harbour town", add_bos=False)


def test_a_scratch_decode_leaves_the_sequence_as_it_was(llm, context):
    scoring = llm.kv_controller.scoring
    before = (llm.kv_positions().copy(), llm.kv_snapshot().data, last_logits(llm), llm.n_tokens,
              llm.input_ids[:llm.n_tokens].copy())
    scores = scoring.decode(scratch(llm), tap=SCORES, batch=8)
    assert scores.shape == (30, 3, len(context)) and np.isfinite(scores).all() and scores.max() > 0
    assert llm.kv_positions().size == len(context)          # the scratch cells are gone already
    scoring.finish()
    after = (llm.kv_positions(), llm.kv_snapshot().data, last_logits(llm), llm.n_tokens,
             llm.input_ids[:llm.n_tokens])
    assert np.array_equal(before[0], after[0]) and before[1] == after[1]
    assert np.array_equal(before[2], after[2])              # bit for bit: the last token decoded alone again
    assert before[3] == after[3] and np.array_equal(before[4], after[4])


@pytest.mark.parametrize("tap_rows", [None, range(4, 9)])
def test_scratch_scores_are_the_taps_over_the_same_rows_decoded_in_the_sequence(llm, context, tap_rows):
    """A scratch decode with the tap on its rows (all, or chosen ones) gives what the tap gives when the same
    tokens are decoded as the sequence's own next tokens and those rows observed; the scratch cells are not part of
    the result."""
    scoring = llm.kv_controller.scoring
    rows = scratch(llm)
    scratch_scores = scoring.decode(rows, tap=SCORES, tap_rows=tap_rows)
    scoring.finish()
    observed = tap_rows or range(len(rows))
    n = llm.n_tokens
    scoring.observe(n + observed.start, n + observed.stop, SCORES)
    llm.eval(rows)
    own = scoring.observed()
    scoring.stop()
    np.testing.assert_array_equal(scratch_scores, own[:, :, :len(context)])
    with pytest.raises(ValueError, match="tap_rows must be a contiguous range"):
        scoring.decode(rows, tap=SCORES, tap_rows=range(0, len(rows) + 1))


def test_embeddings_decode_like_their_tokens(llm, model_path, context):
    """The tokens' own input embeddings (dequantized from the GGUF with gguf-py), decoded as embeddings, score the
    cells as the tokens do."""
    scoring = llm.kv_controller.scoring
    rows = scratch(llm)
    by_tokens = scoring.decode(rows, tap=SCORES)
    by_embeddings = scoring.decode(embeddings=token_embeddings(model_path, rows), tap=SCORES)
    scoring.finish()
    np.testing.assert_allclose(by_embeddings, by_tokens, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"embeddings must have shape \[n, 576\]"):
        scoring.decode(embeddings=np.zeros((3, 100), np.float32), tap=SCORES)
    with pytest.raises(ValueError, match="tokens or embeddings"):
        scoring.decode(rows, embeddings=token_embeddings(model_path, rows))
    assert llm.kv_positions().size == len(context)


def test_an_adapter_is_on_for_its_decode_only(llm, raw_model, model_path, context, tmp_path):
    """With a LoRA adapter on q the scratch rows attend differently, exactly as when llama.cpp runs the adapter on
    the whole context (set by hand on a raw context); after the decode it is off again: the next logits are the
    base model's, bit for bit, and an adapter whose B is zero changes nothing."""
    scoring = llm.kv_controller.scoring
    rows = scratch(llm)
    adapter = LoraAdapter(llm.model, write_lora_adapter(tmp_path / "q.gguf", model_path))
    zero = LoraAdapter(llm.model, write_lora_adapter(tmp_path / "zero.gguf", model_path, zero_b=True))
    try:
        logits = last_logits(llm)
        base = scoring.decode(rows, tap=SCORES)
        with_adapter = scoring.decode(rows, tap=SCORES, adapter=adapter)
        with_zero = scoring.decode(rows, tap=SCORES, adapter=zero)
        scoring.finish()
        np.testing.assert_array_equal(last_logits(llm), logits)
        np.testing.assert_array_equal(with_zero, base)
        changed = np.abs(with_adapter - base).max(axis=(1, 2))
        assert (changed > 1e-3).all(), changed  # every layer's attention moved (layer 0's q, and all after it)

        # the same decode on a raw context of the model with the adapter set by hand for the scratch rows
        raw = RawContext(raw_model, n_ctx=1024, n_batch=256)
        raw_adapter = LoraAdapter(raw_model.model, adapter.path)
        try:
            raw.decode(context[:-1])
            raw.decode(context[-1:])
            handles = (C.llama_adapter_lora_p_ctypes * 1)(raw_adapter.adapter)
            assert C.llama_set_adapters_lora(raw.ctx, handles, 1, (ctypes.c_float * 1)(1.0)) == 0
            tap = AttentionTap(raw.ctx, 30, 3)
            tap.start(0, len(context), len(context) + len(rows), SCORES.rows, SCORES.heads)
            raw.decode(rows)
            np.testing.assert_allclose(tap.scores(0)[:, :, :len(context)], with_adapter, rtol=1e-5, atol=1e-7)
        finally:
            raw.close()
            raw_adapter.close()
    finally:
        adapter.close()
        zero.close()


def test_bad_adapters_are_refused(llm, tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        LoraAdapter(llm.model, tmp_path / "missing.gguf")
    not_an_adapter = tmp_path / "x.gguf"
    not_an_adapter.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match="is not a LoRA adapter for this model"):
        LoraAdapter(llm.model, not_an_adapter)


def test_a_scratch_sequence_scores_like_the_sequence_and_leaves_no_cell(raw_model):
    """Decoded into a scratch sequence that shares the context's cells, the rows attend to the context as they
    would in its own sequence; the scratch sequence is empty afterwards."""
    raw = RawContext(raw_model, n_ctx=1024, n_batch=256, n_seq_max=2)
    try:
        host = RawHost(raw)
        tokens = raw_model.tokenize(haystack(30, seed=4))[:250]
        host.decode_tokens(tokens)
        scoring = ScoringContext(host, raw_model.n_layer, raw_model.n_head_kv)
        rows = raw_model.tokenize(" Repeat the previous context exactly.", add_special=False)
        same = scoring.decode(rows, tap=SCORES)
        other = scoring.decode(rows, tap=SCORES, scratch_sequence=True)
        scoring.finish()
        np.testing.assert_array_equal(other, same)
        memory = C.llama_get_memory(raw.ctx)
        assert C.llama_memory_seq_pos_max(memory, 1) == -1
        assert scoring.positions().tolist() == list(range(len(tokens)))
        scoring.close()
    finally:
        raw.close()


def test_one_sequence_has_no_scratch_sequence(llm, context):
    with pytest.raises(ValueError, match="n_seq_max >= 2"):
        llm.kv_controller.scoring.decode(scratch(llm), tap=SCORES, scratch_sequence=True)
    assert llm.kv_positions().size == len(context)
