"""Compress once, ask many: a context compressed by KVzip before any question is known answers three different
questions, from memory and from a file; bad files and bad values are refused and leave the model usable."""
from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest

from kvgguf import CompressedContext, ContextFileError, Llama
from kvtest import last_logits
from kvgguf.settings import DEFAULT_SINK, validate_settings
from kvgguf.text import filler_sentences

KEEP = 0.2
FACTS = {  # sentence placed in the filler -> (question, the answer's key word)
    "The special magic number for Lisbon is 7315.": ("What is the special magic number for Lisbon?", "7315"),
    "Mira's favourite fruit is the mango.": ("What is Mira's favourite fruit?", "mango"),
    "The blue car belongs to Doctor Okafor.": ("Who does the blue car belong to?", "okafor"),
}
GREEDY = dict(max_tokens=24, temperature=0.0, top_k=1, repeat_penalty=1.0)


def document(seed: int) -> str:
    """~2.2K tokens of filler with the three facts at 14%, 50% and 82% of it."""
    sentences = filler_sentences(110, seed=seed)
    for index, fact in zip((15, 55, 90), FACTS):
        sentences.insert(index, fact)
    return " ".join(sentences)


# Measured at keep 0.2 per KV head over filler seeds 3-10 (n = 8): the first two facts answered on every seed
# (16/16), the third (at 82%) on 3 of them (seeds 7-9). The answers are asserted over SEEDS: the first two facts
# at least 5 of 6 (one flip allowed); every answer must come from the context's own cache (checked after each).
SEEDS = (3, 4, 5)
FIRST_TWO_AT_LEAST = 5


@pytest.fixture(scope="module")
def llm(llm_4k):
    return llm_4k


@pytest.fixture(scope="module")
def contexts(llm) -> dict[int, CompressedContext]:
    # kvzip, per KV head: no question exists yet
    return {seed: llm.compress(document(seed), keep=KEEP, granularity="head") for seed in SEEDS}


@pytest.fixture(scope="module")
def context(contexts) -> CompressedContext:
    return contexts[SEEDS[0]]


def test_three_questions_from_one_compressed_context(llm, contexts):
    right = []
    for context in contexts.values():
        assert context.policy == "kvzip" and context.granularity == "head"
        assert context.n_tokens > 2000
        # the cells are gone, not masked: the cache held the budget after compression
        settings = validate_settings("kvzip", KEEP, kv_sink=max(DEFAULT_SINK, context.n_protected))
        assert context.n_cells == settings.target_cells(context.n_tokens)
        assert context.kept_ratio < KEEP + 0.03
        assert context.head_positions is not None and context.head_positions.shape == (30, 3, context.n_cells)
        assert context.scores is not None and context.scores.shape == (30, 3, context.n_cells)
        answers = {}
        for question, key in FACTS.values():
            answers[question] = llm.ask(context, question, **GREEDY)
            right.append(key in answers[question].lower())
            # the cache holds the kept context cells, then this question and answer only
            positions = llm.kv_positions()
            assert (positions < context.n_tokens).sum() == context.n_cells
            assert positions[context.n_cells:].tolist() == list(range(context.n_tokens, llm.n_tokens))
        # asked again after the others: the same answer (nothing of the other questions leaked into the cache)
        first = next(iter(FACTS.values()))[0]
        assert llm.ask(context, first, **GREEDY) == answers[first]
    first_two = [ok for i, ok in enumerate(right) if i % 3 < 2]
    assert sum(first_two) >= FIRST_TWO_AT_LEAST, right


def test_the_chat_api_streams_the_same_answer(llm, context):
    first = next(iter(FACTS.values()))[0]
    chunks = llm.create_chat_completion([{"role": "user", "content": first}], context=context, stream=True,
                                        **GREEDY)
    streamed = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert streamed == llm.ask(context, first, **GREEDY)


def test_save_load_gives_the_same_answers_and_identical_logits(llm, context, tmp_path):
    path = context.save(tmp_path / "doc.kvc")
    loaded = llm.load_context(path)
    assert loaded.n_cells == context.n_cells and np.array_equal(loaded.head_positions, context.head_positions)
    assert np.array_equal(loaded.scores, context.scores) and loaded.chat == context.chat
    question = list(FACTS.values())[1][0]
    assert llm.ask(loaded, question, **GREEDY) == llm.ask(context, question, **GREEDY)
    probe = llm.tokenize(b"\n\nThe answer is", add_bos=False)
    logits = []
    for ctx in (context, loaded):
        llm.kv_restore(ctx)
        llm.eval(probe)
        logits.append(last_logits(llm))
    assert np.array_equal(logits[0], logits[1])
    # a fresh Llama (another process would do the same) loads it and answers alike
    other = Llama(llm.model_path, n_ctx=1024, n_batch=512, n_threads=2, verbose=False)
    try:
        assert other.ask(other.load_context(path), question, **GREEDY) == llm.ask(context, question, **GREEDY)
    finally:
        other.close()


def with_header(data: bytes, change) -> bytes:
    """A context file's bytes with its JSON header changed by ``change`` (the payload as it was)."""
    magic, version, length = struct.unpack_from("<8sIQ", data)
    header = json.loads(data[20:20 + length])
    change(header)
    encoded = json.dumps(header).encode()
    return struct.pack("<8sIQ", magic, version, len(encoded)) + encoded + data[20 + length:]


def test_bad_files_are_refused_and_the_model_stays_usable(llm, context, tmp_path):
    path = context.save(tmp_path / "good.kvc")
    data = path.read_bytes()
    bad = {
        "not ours": (b"GGUF" + bytes(100), "not a kvgguf context file"),
        "truncated": (data[:-1000], "truncated"),
        "corrupted": (data[:-500] + bytes([data[-500] ^ 0xFF]) + data[-499:], "corrupted"),
        "empty": (b"", "not a kvgguf context file"),
        "newer version": (data[:8] + (99).to_bytes(4, "little") + data[12:], "version 99"),
        "another patch set": (with_header(data, lambda header: header["library"].update(
            patch_set="0" * 64, patches=header["library"]["patches"] + ["0099-other.patch"])),
            "patch set 000000000000.*patches that differ: 0099-other.patch"),
    }
    for name, (content, message) in bad.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ContextFileError, match=message):
            llm.load_context(tmp_path / name)
    with pytest.raises(ContextFileError, match="cannot read"):
        llm.load_context(tmp_path / "missing.kvc")
    # a context of another model file
    other_model = dataclasses.replace(context.model, fingerprint="0" * 64, name="Other-Model")
    dataclasses.replace(context, model=other_model).save(tmp_path / "other.kvc")
    with pytest.raises(ContextFileError, match="model file differs.*Other-Model"):
        llm.load_context(tmp_path / "other.kvc")
    with pytest.raises(ValueError, match="model file differs"):
        llm.ask(dataclasses.replace(context, model=other_model), "What?")
    # a Llama whose cache is too small for it
    small = Llama(llm.model_path, n_ctx=256, n_threads=2, verbose=False)
    try:
        with pytest.raises(ValueError, match=f"holds {context.n_cells} cells"):
            small.load_context(path)
    finally:
        small.close()
    question = list(FACTS.values())[0][0]
    assert llm.ask(llm.load_context(path), question, **GREEDY) == llm.ask(context, question, **GREEDY)


@pytest.mark.parametrize("arguments, message", [
    (dict(keep=0.0), "kv_keep must be in \\(0, 1\\].*0.0"),
    (dict(keep=1.5), "kv_keep must be in \\(0, 1\\].*1.5"),
    (dict(keep="half"), "kv_keep must be a number.*'half'"),
    (dict(budget=-3), "kv_budget must be >= 1.*-3"),
    (dict(keep=0.5, budget=100), "not both"),
    (dict(policy="zip"), "unknown kv_eviction policy 'zip'"),
    (dict(granularity="layer"), "kv_granularity must be one of.*'layer'"),
    (dict(system=7), "system must be a string"),
])
def test_bad_compress_arguments_are_refused(llm, context, arguments, message):
    with pytest.raises(ValueError, match=message):
        llm.compress("A short text.", **arguments)
    with pytest.raises(ValueError, match="outside"):
        llm.compress([1, 2, llm.n_vocab() + 5])
    with pytest.raises(ValueError, match="empty"):
        llm.compress("")


@pytest.mark.parametrize("granularity", ["head", None])   # None: kvzip's default, per token
def test_system_prompt_and_template_are_kept_in_every_head(llm, granularity):
    """Measured over filler seeds 3-10 (n = 8): the gate code answered 8/8 at either granularity; asserted over
    seeds 3-5: at least 2 of 3."""
    right = []
    for seed in (3, 4, 5):
        text = " ".join(filler_sentences(20, seed=seed)) + " The gate code is 4471."
        small = llm.compress(text, keep=0.2, system="You answer in one short sentence.", granularity=granularity)
        assert small.chat.system == "You answer in one short sentence."
        assert small.granularity == (granularity or "token")
        assert small.n_protected > 10
        protected = np.arange(small.n_protected)
        assert (small.positions[:small.n_protected] == protected).all()
        if granularity == "head":
            assert (small.head_positions[:, :, :small.n_protected] == protected).all()
        else:
            assert small.head_positions is None   # one decision per token: every head holds the same tokens
        right.append("4471" in llm.ask(small, "What is the gate code?", **GREEDY))
    assert sum(right) >= 2, right
    with pytest.raises(ValueError, match="system prompt is part of the compressed context"):
        llm.create_chat_completion([{"role": "system", "content": "x"}, {"role": "user", "content": "q"}],
                                   context=small)


# Measured on filler seeds 3-10 (n = 8) with the facts at sentences 21, 75 and 122 and n_ctx 1024: the chunked
# compression answered the first two facts 14 of 16 times (seeds 3-6: 6 of 8), the third 1 of 8; the full cache
# (8K cells) answered 9 of 12 on seeds 3-6, single-pass KVzip at keep 0.2 the first two everywhere. The third (late)
# fact is hard for the model itself, so the first two are asserted over CHUNKED_SEEDS: at least 5 of 8.
CHUNKED_SEEDS = (3, 4, 5, 6)
CHUNKED_AT_LEAST = 5


def test_a_context_three_times_n_ctx_ends_up_compressed_in_the_cache(model_path):
    """Chunked prefill: KVzip scores each piece by reconstructing it and evicts before the next one."""
    llm = Llama(model_path, n_ctx=1024, n_batch=512, n_threads=2, verbose=False, kv_head_profile=None)
    right = []
    try:
        for seed in CHUNKED_SEEDS:
            sentences = filler_sentences(150, seed=seed)
            for index, fact in zip((21, 75, 122), FACTS):
                sentences.insert(index, fact)
            long_context = llm.compress(" ".join(sentences), keep=KEEP, granularity="head")
            assert long_context.n_tokens > 2.5 * llm.n_ctx()
            assert long_context.n_cells <= llm.n_ctx()
            assert len(llm.kv_stats()["history"]) > 5           # evicted piece by piece
            assert long_context.head_positions.min() == 0
            assert long_context.positions.max() == long_context.n_tokens - 1
            for question, key in list(FACTS.values())[:2]:
                right.append(key in llm.ask(long_context, question, **GREEDY).lower())
    finally:
        llm.close()
    assert sum(right) >= CHUNKED_AT_LEAST, right
