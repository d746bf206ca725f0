"""The tiered KV cache (patches 0011-0012) on the real model: the KV heads of each layer in tiers of different
lengths, each tier evicted and compacted on its own.

A layer whose heads share one tier runs llama.cpp's own attention on that tier; a split layer attends once per
tier, on views of its heads where each tier holds a run of consecutive heads, else permuting the heads tier by
tier and the outputs back (the layouts here have both kinds of split layer). Per-head attention does not depend
on which other heads run beside it, so nothing here has a tolerance: a tiered cache holding what a plain cache
holds gives the same logits, bit for bit (measured on AVX512 and AVX2 builds, flash attention on and off).
"""
from __future__ import annotations

import ctypes
from collections import Counter

import numpy as np
import pytest

from kvgguf._native import AttnTapParams, NativeError, libllama
from kvgguf.tap import AttentionTap
from kvgguf.text import haystack
from kvgguf.tiers import KVTierLayout
from kvtest import C, RawContext, _libggml_base

N_PROMPT = 400
N_CTX = 1024
N_BATCH = 128  # the prompt takes several ubatches


@pytest.fixture(scope="module")
def prompt(raw_model) -> list[int]:
    tokens = raw_model.tokenize(haystack(60))
    assert len(tokens) >= N_PROMPT
    return tokens[:N_PROMPT]


def split_layout(raw_model, n_cells: tuple[int, ...], seed: int = 0) -> KVTierLayout:
    """Every tier used, the first and last layers whole in one tier, layer 1 spread over all tiers, layer 2 with
    its middle head apart, the rest at random."""
    rng = np.random.default_rng(seed)
    n_tiers = len(n_cells)
    tiers = rng.integers(0, n_tiers, size=(raw_model.n_layer, raw_model.n_head_kv))
    tiers[0] = 0
    tiers[-1] = n_tiers - 1
    tiers[1] = np.arange(raw_model.n_head_kv) % n_tiers
    if n_tiers > 1:
        tiers[2] = 0
        tiers[2, 1] = 1  # heads 0 and 2 in one tier, head 1 in another: the graph permutes this layer's heads
        split = [row for row in tiers if len(set(row)) > 1]
        assert any(in_runs(row) for row in split) and not all(in_runs(row) for row in split)
    return KVTierLayout(n_cells, tiers)


def in_runs(row: np.ndarray) -> bool:
    """Whether each tier of a layer holds consecutive KV heads (the graph takes views instead of permuting)."""
    return 1 + int(np.count_nonzero(row[1:] != row[:-1])) == len(set(row.tolist()))


def random_lists(raw_model, n_keep: int, rng: np.random.Generator, n: int = N_PROMPT) -> np.ndarray:
    """A keep list of n_keep positions per (layer, KV head), each with the newest position."""
    lists = np.empty((raw_model.n_layer, raw_model.n_head_kv, n_keep), dtype=np.int32)
    for il in range(raw_model.n_layer):
        for h in range(raw_model.n_head_kv):
            lists[il, h] = np.sort(np.append(rng.choice(n - 1, n_keep - 1, replace=False), n - 1))
    return lists


def decode_steps(ctx: RawContext, first: int, tokens: list[int]) -> list[np.ndarray]:
    """Decode tokens one by one from position `first`; the logits after each."""
    return [ctx.decode([t], positions=[first + i]) for i, t in enumerate(tokens)]


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
@pytest.mark.parametrize("n_cells", [(N_CTX,), (N_CTX, 512, 768)], ids=["1-tier", "3-tiers"])
def test_tiers_without_eviction_equal_the_plain_cache(raw_model, prompt, flash_attn, n_cells):
    plain = RawContext(raw_model, n_ctx=N_CTX, flash_attn=flash_attn, n_batch=N_BATCH)
    tiered = RawContext(raw_model, n_ctx=N_CTX, flash_attn=flash_attn, n_batch=N_BATCH)
    try:
        layout = split_layout(raw_model, n_cells)
        tiered.set_tiers(layout)
        assert libllama.llama_memory_n_tiers(tiered.mem) == len(n_cells)
        assert np.array_equal(plain.decode(prompt), tiered.decode(prompt))  # four ubatches
        steps = raw_model.tokenize(" and then the", add_special=False) * 4
        for a, b in zip(decode_steps(plain, N_PROMPT, steps), decode_steps(tiered, N_PROMPT, steps)):
            assert np.array_equal(a, b)
        for t in range(len(n_cells)):
            assert np.array_equal(tiered.view(tier=t).positions(), np.arange(N_PROMPT + len(steps)))
    finally:
        plain.close()
        tiered.close()


VIEW_OPS = {"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"}


def decode_step_ops(raw_model, prompt, flash_attn: bool, layout: KVTierLayout | None) -> Counter:
    """The compute ops (views left out) of the graph of one single-token decode step after the prompt."""
    ops: Counter = Counter()
    counting = [False]

    def count(tensor, ask, user_data) -> bool:
        if ask and counting[0]:
            op = _libggml_base.ggml_op_desc(tensor).decode()
            if op not in VIEW_OPS:
                ops[op] += 1
        return False

    ctx = RawContext(raw_model, n_ctx=N_CTX, flash_attn=flash_attn, n_batch=N_BATCH, cb_eval=count)
    try:
        if layout is not None:
            ctx.set_tiers(layout)
        ctx.decode(prompt)
        counting[0] = True
        ctx.decode(prompt[:1], positions=[len(prompt)])
    finally:
        ctx.close()
    return ops


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_a_split_layer_costs_one_attention_per_tier(raw_model, prompt, flash_attn):
    """On the CPU every graph node ends with a barrier of the threads, a large share of a small model's decode
    step, so the split layers' nodes are counted: with each tier holding consecutive heads, a layer split in two
    tiers adds exactly one attention (its two stores, and KQ, softmax, KQV or one flash attention) and one concat
    to a decode step; heads 0 and 2 apart from head 1 add the four head permutations (q, k, v and back)."""
    n_layer = raw_model.n_layer
    runs = KVTierLayout((N_CTX, 512), np.tile(np.array([0, 0, 1], dtype=np.int32), (n_layer, 1)))
    apart = KVTierLayout((N_CTX, 512), np.tile(np.array([0, 1, 0], dtype=np.int32), (n_layer, 1)))
    plain = decode_step_ops(raw_model, prompt, flash_attn, None)
    attention = {"FLASH_ATTN_EXT": 1} if flash_attn else {"MUL_MAT": 2, "SOFT_MAX": 1}
    per_layer = Counter({"SET_ROWS": 2, "CONCAT": 1, **attention})
    expected = plain + Counter({op: n * n_layer for op, n in per_layer.items()})
    assert decode_step_ops(raw_model, prompt, flash_attn, runs) == expected
    assert decode_step_ops(raw_model, prompt, flash_attn, apart) == expected + Counter({"GET_ROWS": 4 * n_layer})
    if not flash_attn:
        assert plain["CONT"] == 0  # patch 0014: a one-token attention output is reshaped, not copied


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_tier_compaction_equals_plain_head_compaction(raw_model, prompt, flash_attn):
    """Keep lists of one length in every tier: the tiers then hold what a plain cache holds after the same
    per-head compaction, and decode the same logits."""
    layout = split_layout(raw_model, (N_CTX, 512, 768), seed=1)
    lists = random_lists(raw_model, 120, np.random.default_rng(3))
    plain = RawContext(raw_model, n_ctx=N_CTX, flash_attn=flash_attn, n_batch=N_BATCH)
    tiered = RawContext(raw_model, n_ctx=N_CTX, flash_attn=flash_attn, n_batch=N_BATCH)
    try:
        tiered.set_tiers(layout)
        plain.decode(prompt)
        tiered.decode(prompt)
        assert plain.view().compact(lists) == N_PROMPT - 120
        for t in range(layout.n_tiers):
            view = tiered.view(tier=t)
            assert view.compact(layout.pack(t, lists)) == N_PROMPT - 120
            # a cell takes the largest position of the tokens its heads keep, here over the tier's heads only
            heads = layout.heads(t)
            assert np.array_equal(view.positions(), lists[heads[:, 0], heads[:, 1]].max(axis=0))
            assert view.n_attended() == 256
            assert view.n_mixed() > 0
        steps = raw_model.tokenize(" and then the", add_special=False) * 3
        for a, b in zip(decode_steps(plain, N_PROMPT, steps), decode_steps(tiered, N_PROMPT, steps)):
            assert np.array_equal(a, b)
    finally:
        plain.close()
        tiered.close()


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_tiers_allocate_only_their_heads(raw_model, flash_attn):
    """A tier holds n_cells rows of its own heads only (no padding of the transposed V cache to whole layers): the
    bytes are the sum over tiers of cells x heads x the K and V row sizes."""
    layout = split_layout(raw_model, (1024, 512, 256), seed=13)
    ctx = RawContext(raw_model, n_ctx=N_CTX, flash_attn=flash_attn)
    try:
        head_bytes = 64 * 2 * 2  # K and V, n_embd_head 64, f16
        assert libllama.llama_memory_size(ctx.mem) == N_CTX * raw_model.n_layer * raw_model.n_head_kv * head_bytes
        ctx.set_tiers(layout)
        expected = sum(n * (layout.tier_of_head == t).sum() * head_bytes for t, n in enumerate(layout.n_cells))
        assert libllama.llama_memory_size(ctx.mem) == expected
        ctx.set_tiers(None)
        assert libllama.llama_memory_size(ctx.mem) == N_CTX * raw_model.n_layer * raw_model.n_head_kv * head_bytes
    finally:
        ctx.close()


def test_tiers_keep_different_lengths_and_free_their_cells(raw_model, prompt):
    """A prompt longer than the small tiers, prefilled in chunks with each tier evicted to its own budget in
    between (as the controller does): each tier keeps its own number of tokens per head, the cells past them are
    freed, and every tier grows by one cell per decoded token."""
    layout = split_layout(raw_model, (512, 384, 256), seed=2)
    budget = {1: 150, 2: 40}
    rng = np.random.default_rng(4)
    ctx = RawContext(raw_model, n_ctx=N_CTX, n_batch=N_BATCH)
    try:
        ctx.set_tiers(layout)
        for chunk in range(0, N_PROMPT, 200):
            ctx.decode(prompt[chunk:chunk + 200], positions=list(range(chunk, chunk + 200)))
            for t, n_keep in budget.items():
                view = ctx.view(tier=t)
                held = view.positions()
                lists = np.stack([np.sort(np.append(rng.choice(held[:-1], n_keep - 1, replace=False), held[-1]))
                                  for _ in range(len(layout.heads(t)))])
                assert view.compact(lists) == len(held) - n_keep
        assert ctx.view(tier=0).n_cells() == N_PROMPT
        steps = raw_model.tokenize(" and then the", add_special=False) * 3
        logits = decode_steps(ctx, N_PROMPT, steps)
        assert all(np.isfinite(x).all() for x in logits)
        assert ctx.view(tier=0).n_cells() == N_PROMPT + len(steps)
        for t, n_keep in budget.items():
            assert ctx.view(tier=t).n_cells() == n_keep + len(steps)
            assert ctx.view(tier=t).positions()[-len(steps):].tolist() == list(range(N_PROMPT, N_PROMPT + len(steps)))
        assert C.llama_memory_seq_pos_max(ctx.mem, 0) == N_PROMPT + len(steps) - 1
        # a batch larger than a tier's free cells is refused whole: no tier takes any of it
        before = [ctx.view(tier=t).n_cells() for t in range(3)]
        batch = C.llama_batch_get_one((C.llama_token * 230)(*prompt[:230]), 230)
        assert C.llama_decode(ctx.ctx, batch) != 0
        assert [ctx.view(tier=t).n_cells() for t in range(3)] == before
    finally:
        ctx.close()


def test_state_round_trip_and_layout_check(raw_model, prompt):
    layout = split_layout(raw_model, (N_CTX, 512, 768), seed=5)
    lists = random_lists(raw_model, 100, np.random.default_rng(6))
    nxt = raw_model.tokenize(" The", add_special=False)[0]
    src = RawContext(raw_model, n_ctx=N_CTX, n_batch=N_BATCH)
    dst = RawContext(raw_model, n_ctx=N_CTX, n_batch=N_BATCH)
    other = RawContext(raw_model, n_ctx=N_CTX, n_batch=N_BATCH)
    try:
        src.set_tiers(layout)
        src.decode(prompt)
        for t in range(layout.n_tiers):
            src.view(tier=t).compact(layout.pack(t, lists))
        state = src.save()
        expected = src.decode([nxt], positions=[N_PROMPT])

        dst.set_tiers(layout)
        dst.load(state)
        for t in range(layout.n_tiers):
            assert np.array_equal(dst.view(tier=t).positions(), src.view(tier=t).positions()[:-1])
        assert np.array_equal(dst.decode([nxt], positions=[N_PROMPT]), expected)

        # the same tier sizes with the heads in other tiers: refused, and the context stays usable
        other.set_tiers(split_layout(raw_model, (N_CTX, 512, 768), seed=7))
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        assert C.llama_state_set_data(other.ctx, buf, len(state)) == 0
        other.decode(prompt[:50])
        assert other.view(tier=0).n_cells() == 50
        # and a plain cache does not read a tiered state either
        other.set_tiers(None)
        assert C.llama_state_set_data(other.ctx, buf, len(state)) == 0
    finally:
        src.close()
        dst.close()
        other.close()


def test_shift_of_head_mixed_cells_is_refused_in_every_tier(raw_model, prompt):
    layout = split_layout(raw_model, (N_CTX, 512), seed=8)
    ctx = RawContext(raw_model, n_ctx=N_CTX, n_batch=N_BATCH)
    try:
        ctx.set_tiers(layout)
        ctx.decode(prompt)
        # tier 1 becomes head-mixed; tier 0 keeps whole tokens and could shift on its own
        ctx.view(tier=1).compact(layout.pack(1, random_lists(raw_model, 200, np.random.default_rng(9))))
        before = [ctx.view(tier=t).positions() for t in range(2)]
        C.llama_memory_seq_add(ctx.mem, 0, 0, N_PROMPT, 10)
        assert all(np.array_equal(ctx.view(tier=t).positions(), before[t]) for t in range(2))
        # without mixed cells in the range, every tier shifts
        C.llama_memory_seq_rm(ctx.mem, 0, -1, -1)
        ctx.decode(prompt[:20])
        C.llama_memory_seq_add(ctx.mem, 0, 0, 20, 5)
        assert all(ctx.view(tier=t).positions().tolist() == list(range(5, 25)) for t in range(2))
    finally:
        ctx.close()


@pytest.mark.parametrize("flash_attn", [False, True], ids=["fa-off", "fa-on"])
def test_tap_reads_each_tier(raw_model, prompt, flash_attn):
    """The attention tap on a tiered cache gives, per tier, the plain cache's scores for the heads that live there
    (zeros for the others); after a tier is compacted, its scores follow its own cells."""
    layout = split_layout(raw_model, (N_CTX, 512, 768), seed=11)
    plain = RawContext(raw_model, n_ctx=N_CTX, flash_attn=flash_attn, n_batch=N_BATCH)
    tiered = RawContext(raw_model, n_ctx=N_CTX, flash_attn=flash_attn, n_batch=N_BATCH)
    try:
        tiered.set_tiers(layout)
        taps = [AttentionTap(ctx.ctx, raw_model.n_layer, raw_model.n_head_kv) for ctx in (plain, tiered)]
        for tap in taps:
            tap.start(0, 200, N_PROMPT, reduce_rows="mean", reduce_heads="max")
        plain.decode(prompt)
        tiered.decode(prompt)
        expected = taps[0].scores(0)
        with pytest.raises(NativeError):
            taps[1].scores(0)  # a tiered cache is read per tier
        for t in range(layout.n_tiers):
            scores = taps[1].scores(0, tier=t)
            mine = layout.tier_of_head == t
            assert np.array_equal(scores[mine], expected[mine])
            assert not scores[~mine].any()
        # tier 1 keeps 100 tokens per head; the scores of the next observers follow its cells
        lists = random_lists(raw_model, 100, np.random.default_rng(12))
        tiered.view(tier=1).compact(layout.pack(1, lists))
        taps[1].start(0, N_PROMPT, N_PROMPT + 10, reduce_rows="max", reduce_heads="max")
        tiered.decode(prompt[:10], positions=list(range(N_PROMPT, N_PROMPT + 10)))
        scores = taps[1].scores(0, tier=1)
        assert scores.shape[2] == 110 and np.isfinite(scores).all()
        assert (scores[layout.tier_of_head == 1] > 0).all()
    finally:
        plain.close()
        tiered.close()


def test_bad_layouts_and_unsupported_calls(raw_model):
    ctx = RawContext(raw_model, n_ctx=256)
    try:
        n_layer, n_head = raw_model.n_layer, raw_model.n_head_kv
        with pytest.raises(ValueError, match="tiers"):
            KVTierLayout((256,) * 9, np.zeros((n_layer, n_head)))
        with pytest.raises(ValueError, match=r"tier_of_head\[0, 1\] = 3"):
            KVTierLayout((256, 256), np.array([[0, 3, 1]] + [[0, 1, 1]] * (n_layer - 1)))
        with pytest.raises(ValueError, match=r"tiers \[1\] hold no KV head"):
            KVTierLayout((256, 256), np.zeros((n_layer, n_head)))
        with pytest.raises(ValueError, match="at least one cell"):
            KVTierLayout((256, 0), np.ones((n_layer, n_head)) * np.array([0, 1, 1]))
        with pytest.raises(ValueError, match="the model has"):
            KVTierLayout((256,), np.zeros((n_layer - 1, n_head))).apply(ctx.ctx)
        # a keep list per head of the tier: the wrong count or a position the tier lacks is refused whole
        layout = split_layout(raw_model, (256, 256), seed=10)
        ctx.set_tiers(layout)
        ctx.decode(list(range(100, 150)))
        n_lists = len(layout.heads(1))
        with pytest.raises(ValueError, match=f"one list per \\(layer, KV head\\) of the cache, {n_lists}"):
            ctx.view(tier=1).compact(np.tile(np.arange(40, 50), (n_lists + 1, 1)))
        repeated = np.tile(np.arange(40, 50), (n_lists, 1))
        repeated[0, 0] = 49
        with pytest.raises(NativeError, match="kv_compact_tier"):
            ctx.view(tier=1).compact(repeated)
        with pytest.raises(NativeError, match="no tier 2"):
            ctx.view(tier=2).positions()
        # a tier that does not exist
        params = AttnTapParams(0, 0, 1 << 30, 0, 0)
        assert libllama.llama_attn_tap_set(ctx.ctx, ctypes.byref(params)) == 0
        assert libllama.llama_attn_tap_get_tier(ctx.ctx, 2, 0, None, 0) == -1
        assert libllama.llama_attn_tap_set(ctx.ctx, None) == 0
        assert ctx.view(tier=0).n_cells() == 50 and ctx.view(tier=1).n_cells() == 50
    finally:
        ctx.close()
