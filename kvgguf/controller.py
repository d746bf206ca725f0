"""The eviction controller: one per sequence, the one place that decides *when* and *how much* to evict.

It holds the policy and its settings, the budget, the protected cells (the sinks or the chat template's head,
the recent window, the newest cell) and the granularity, and it drives the sequence's decodes:
  - a prompt is prefilled in pieces that fit the cache, with an eviction between pieces when it does not, and
    evicted to the budget once it is all in;
  - decoding that would overflow the cache evicts first (with some slack, so not at every token);
  - a policy that observes decoding gets every decoded token's attention (``Policy.observe_step``), and with
    ``kv_evict_every`` = W the cache is brought back to the budget every W decoded tokens, leaving the freed
    cells as holes for the next tokens when that is cheaper than compacting.
Policies score through the scoring context; the engine evicts. Nothing here knows what a policy decodes.
"""
from __future__ import annotations

import contextlib
import ctypes
import numbers
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._native import libllama, llama_cpp_api
from .chat import ChatTemplate
from .engine import EvictionEngine
from .policies import Policy
from .scores import reduce_groups
from .scoring import ScoringContext, ScoringHost, TapSpec
from .settings import EvictionSettings
from .tiers import TierPlan, TieredEngine, clear_tiers

if TYPE_CHECKING:
    from .head_profile import HeadProfile
    from .lookahead import LookaheadRuntime

logger = logging.getLogger(__name__)

# cells a chat template's head of a user turn may take beyond the sinks (a tier plan keeps room for them)
TEMPLATE_HEAD_MARGIN = 16


def memory_kind(model: Any) -> str:
    """What llama.cpp keeps of the past for ``model``, in words (for the error that refuses eviction on it)."""
    buffer = ctypes.create_string_buffer(64)
    found = llama_cpp_api.llama_model_meta_val_str(model, b"general.architecture", buffer, len(buffer)) > 0
    name = f" ({buffer.value.decode(errors='replace')})" if found else ""
    if llama_cpp_api.llama_model_is_hybrid(model):
        return f"hybrid{name}, a recurrent state beside an attention KV cache"
    if llama_cpp_api.llama_model_is_recurrent(model):
        return f"recurrent{name}, a fixed-size state per sequence with no KV cells"
    if llama_cpp_api.llama_model_n_swa(model) > 0:
        return f"a sliding-window cache beside a full-attention cache{name}"
    return f"not one attention KV cache{name}"


class EvictionController:
    """Eviction for one sequence of a llama.cpp context (see the module docstring)."""

    def __init__(self, host: ScoringHost, engine: EvictionEngine, scoring: ScoringContext,
                 chat: ChatTemplate | None) -> None:
        self.host = host
        self.engine: EvictionEngine | TieredEngine = engine
        self.plain_engine = engine
        self.scoring = scoring
        # a per-model head profile (kvgguf.head_profile): with one, a policy that uses it evicts in a tiered
        # cache (Policy.plan_tiers); the plan in use, None for the plain cache
        self.head_profile: HeadProfile | None = None
        self.tier_plan: TierPlan | None = None
        # a trained LookaheadKV module of the model (kvgguf.lookahead), for the policies that score with one
        self.lookahead: LookaheadRuntime | None = None
        self._settings_plan: TierPlan | None = None  # the plan of the settings (a restored context may differ)
        self.chat = chat
        self.settings: EvictionSettings | None = None
        self.policy: Policy | None = None
        self.last_scores: dict[str, npt.NDArray] | None = None
        self.lossy = False            # the cache is not a copy of the tokens (eviction, or a compressed context)
        self._prompt_pending = False  # the next eval() is a prompt: prefill it with eviction
        self._head_hint: int | None = None  # the template head's length, when the caller knows it (compress)
        self._steps = 0               # tokens decoded since the last decode-time eviction (kv_evict_every)
        self._decode_budget: int | None = None  # cells the cache goes back to while decoding (kv_evict_every)
        self._budget_set = False  # a prompt was evicted to its budget (or a context restored) since the reset

    # --- settings -----------------------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """Cells of the cache (of its smallest tier, for a tiered one)."""
        return self.scoring.n_ctx

    @property
    def tiered(self) -> bool:
        """The sequence lives in a tiered KV cache (``kvgguf.tiers``): room and budgets are per tier."""
        return self.scoring.tiers is not None

    @property
    def evictable(self) -> bool:
        """The sequence's memory is a KV cache eviction works on (one attention cache, or our tiered one)."""
        return self.tiered or libllama.llama_memory_n_attended(self.engine.cache.memory, self.host.seq_id) >= 0

    def check(self, settings: EvictionSettings | None) -> Policy | None:
        """The policy for ``settings``, or ValueError if they can not work in this context."""
        if settings is None:
            return None
        if not self.evictable:
            raise ValueError(f"kv_eviction={settings.policy_name!r} needs a single attention KV cache, and this "
                             f"model's memory is {memory_kind(self.host.model)}: kvgguf does not evict in such "
                             "memory")
        n_ctx = self.n_ctx
        if settings.budget is not None and settings.budget > n_ctx:
            raise ValueError(f"kv_budget={settings.budget} is larger than n_ctx={n_ctx}")
        if settings.sink + settings.window + 2 > n_ctx:
            raise ValueError(f"kv_sink + kv_window = {settings.sink + settings.window} leaves no room in "
                             f"n_ctx={n_ctx}")
        if settings.granularity == "head" and not self.engine.cache.can_compact_per_head():
            raise ValueError(f"kv_granularity='head' (for {settings.policy_name!r}) is not possible with this model: "
                             "it uses ALiBi, whose bias comes from each cell's one position, and a per-head "
                             "eviction fills cells with different tokens per KV head; use kv_granularity='token'")
        policy = settings.policy()
        if policy.uses_lookahead:
            if self.lookahead is None:
                raise ValueError(f"kv_eviction={settings.policy_name!r} needs a lookahead module of this model: pass "
                                 "kv_lookahead= a file made by `kvgguf train-lookahead` and `kvgguf convert "
                                 "lookahead` (none ships for this model)")
            policy.lookahead = self.lookahead
        if policy.head_profile_use == "required" and self.head_profile is None:
            raise ValueError(f"kv_eviction={settings.policy_name!r} needs a head profile of this model: pass "
                             "kv_head_profile= a file made by `kvgguf profile-heads` (none ships for this model)")
        if policy.head_profile_use is not None and self.head_profile is not None and policy.observes_decode:
            raise ValueError(f"kv_eviction={settings.policy_name!r} observes decoding, which a tiered cache does "
                             "not support yet; use kv_head_profile=None")
        if self.plan_for(settings, policy) is None:
            policy.check_fits(self.scoring, settings.sink + settings.window)
        return policy

    def plan_for(self, settings: EvictionSettings | None, policy: Policy | None) -> TierPlan | None:
        """The tiered cache ``policy`` evicts in with this controller's head profile; None: the plain cache."""
        if settings is None or policy is None or policy.head_profile_use is None or self.head_profile is None:
            return None
        tiers, self.scoring.tiers = self.scoring.tiers, None  # plan over the context's plain n_ctx
        try:
            return policy.plan_tiers(self.head_profile, self.scoring,
                                     settings.sink + settings.window + TEMPLATE_HEAD_MARGIN + 1)
        finally:
            self.scoring.tiers = tiers

    def use_settings_tiers(self) -> None:
        """The cache the settings evict in again (after a restored context made with others); empties it if it
        changes."""
        self.use_tiers(self._settings_plan)

    def use_tiers(self, plan: TierPlan | None) -> None:
        """Evict in a tiered cache with ``plan`` (None: the plain cache). A different layout than the one in use
        replaces the context's KV cache, empty: the sequence starts over."""
        current = self.tier_plan
        if plan is None and current is None:
            return
        if plan is not None and current is not None and plan.layout.n_cells == current.layout.n_cells and \
                np.array_equal(plan.layout.tier_of_head, current.layout.tier_of_head):
            self.tier_plan = plan
            self.engine.keep_fraction = plan.keep_fraction
            return
        self.scoring.stop()
        if plan is None:
            clear_tiers(self.host.ctx)
            self.engine = self.plain_engine
            self.scoring.tiers = None
        else:
            plan.layout.apply(self.host.ctx)
            self.engine = TieredEngine(self.host.ctx, self.host.seq_id, plan.layout, plan.keep_fraction,
                                       self.plain_engine.stats)
            self.scoring.tiers = self.engine
        self.host.memory_replaced()
        self.tier_plan = plan
        self.host.n_tokens = 0
        self.reset()

    def configure(self, settings: EvictionSettings | None, policy: Policy | None = None,
                  head_profile: HeadProfile | None | object = ...,
                  lookahead: LookaheadRuntime | None | object = ...) -> None:
        """Use ``settings`` (and ``head_profile`` and ``lookahead``, when given) from now on, checked with
        ``check`` unless its policy is given; on ValueError nothing changes."""
        if head_profile is not ... or lookahead is not ...:
            previous = self.head_profile, self.lookahead
            if head_profile is not ...:
                self.head_profile = head_profile  # type: ignore[assignment]
            if lookahead is not ...:
                self.lookahead = lookahead  # type: ignore[assignment]
            try:
                policy = self.check(settings)
            except ValueError:
                self.head_profile, self.lookahead = previous
                raise
        elif policy is None:
            policy = self.check(settings)
        self.scoring.stop()
        self._settings_plan = self.plan_for(settings, policy)
        self.use_tiers(self._settings_plan)
        self.settings, self.policy = settings, policy
        self.last_scores = None
        self._prompt_pending = False
        self._steps = 0
        self._decode_budget = None

    @contextlib.contextmanager
    def using(self, settings: EvictionSettings, head: int) -> Iterator[Policy]:
        """Evict with ``settings`` inside the block (the prompt's first ``head`` cells are its template), then
        go back to the settings before; the caller resets the cache afterwards."""
        policy = self.check(settings)
        assert policy is not None
        self.scoring.stop()
        previous = self.settings, self.policy, self.last_scores
        previous_plan = self._settings_plan
        self._settings_plan = self.plan_for(settings, policy)
        self.use_tiers(self._settings_plan)
        self.settings, self.policy, self.last_scores = settings, policy, None
        self._head_hint = head
        try:
            yield policy
        finally:
            self.scoring.stop()
            self.settings, self.policy, self.last_scores = previous
            self._prompt_pending = False
            self._head_hint = None
            self._settings_plan = previous_plan
            self.use_tiers(previous_plan)

    # --- the sequence's life ------------------------------------------------------------------------------------

    def reset(self) -> None:
        """The cache was cleared."""
        self.scoring.stop()
        self.lossy = False
        self.scoring.protected_head = 0
        self._steps = 0
        self._decode_budget = None
        self._budget_set = False
        if self.policy is not None:
            self.policy.reset()
        self.engine.forget_layout()

    def begin_prompt(self) -> None:
        """The next ``eval`` is a prompt: with a policy, it is prefilled with eviction."""
        self._prompt_pending = self.policy is not None

    def restored(self, lossy: bool, protected_head: int = 0, policy_name: str | None = None,
                 scores: npt.NDArray[np.float32] | None = None) -> None:
        """A snapshot or a compressed context (made by ``policy_name``, its cells scored ``scores``) now fills
        the cache."""
        self.lossy = lossy
        self.scoring.protected_head = protected_head
        self._budget_set = True
        if scores is not None and self.policy is not None and self.policy.name == policy_name:
            # the context's cells keep their scores; a decode-time eviction scores only what was decoded since
            self.policy.resume(scores)
        if self.policy is not None:
            self.policy.begin_decode()

    def eval(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` as the sequence's next ones, evicting as the settings say."""
        tokens = list(tokens)
        if self.policy is None:
            room = self.engine.room() if self.lossy or self.tiered else self.n_ctx - self.host.n_tokens
            if len(tokens) > room:
                raise ValueError(f"the cache is full: {len(tokens)} new tokens do not fit the {room} free cells of "
                                 f"n_ctx={self.n_ctx}; use a larger n_ctx, or kv_eviction= to evict while decoding")
            return self.host.decode_tokens(tokens)
        if self._prompt_pending:
            self._prompt_pending = False
            return self._prefill(tokens)
        # cells past n_tokens (left by a reset(), say) are what llama-cpp-python's eval drops anyway: drop them
        # before counting the room, or they would be evicted for, and scored, as if they were context
        self._drop_stale_cells()
        if len(tokens) > 1 and len(tokens) > self.engine.room() - self.reserve():
            pieces = self._pieces(tokens)
            if len(pieces) > 1:
                for piece in pieces:
                    self.eval(piece)
                return None
        if self.engine.room() - len(tokens) < self.window + 1:
            # the cache is about to fill: the next tokens may observe, as the prompt's last ones did at prefill
            self.policy.observe_decode(self.scoring, self.host.n_tokens)
        self._make_room(len(tokens))
        return self._decode_and_evict_every(tokens)

    def _pieces(self, tokens: list[int]) -> list[list[int]]:
        """More tokens than free cells after the cache's (a conversation's next turn), in the pieces that make
        each eviction free room for a whole piece, scored by the queries before it: a policy that scores every
        decoded token evicts before the tokens, one that needs an observation window sees the window's worth of
        them first (what fits, then the window observed, then the rest). Pieces of at most half the context."""
        size = max(1, self.n_ctx // 2)
        head: list[list[int]] = []
        assert self.policy is not None
        if not self.policy.observes_decode:
            n_free = max(0, self.engine.room() - self.reserve() - self.window - 1)
            n_head = min(len(tokens), n_free + self.window)
            head = [tokens[start:min(start + size, n_free)] for start in range(0, n_free, size)]
            head.append(tokens[n_free:n_head])
            tokens = tokens[n_head:]
        return [piece for piece in head if piece] + [tokens[start:start + size] for start in range(0, len(tokens), size)]

    # --- when to evict ------------------------------------------------------------------------------------------

    @property
    def window(self) -> int:
        """Recent cells kept at every eviction, and the room left for observers (at least one)."""
        assert self.settings is not None
        return max(1, self.settings.window)

    @property
    def protected_head(self) -> int:
        """The first cells never evicted: the sinks, or the chat template's head if longer."""
        assert self.settings is not None
        return max(self.settings.sink, self.scoring.protected_head)

    def reserve(self) -> int:
        """Cells kept free for the policy's scoring decodes."""
        return self.policy.reserve(self.scoring) if self.policy is not None else 0

    def _drop_stale_cells(self) -> None:
        llama_cpp_api.llama_memory_seq_rm(self.engine.cache.memory, -1, self.host.n_tokens, -1)

    def _prefill(self, tokens: list[int]) -> None:
        """Prefill in pieces that fit the cache, evicting between pieces, then evict to the budget."""
        settings, policy = self.settings, self.policy
        assert settings is not None and policy is not None
        if policy.protects_template_head and not self.lossy:
            # the cache holds every token so far as decoded: the head is read off the whole prompt, however it
            # arrives (one prefill, or continuing a restored snapshot or an earlier prefill without eviction)
            if self._head_hint is not None:
                self.scoring.protected_head = self._head_hint
            elif self.chat is not None:
                self.scoring.protected_head = self.chat.head_length(
                    self.host.token_ids()[:self.host.n_tokens].tolist() + tokens)
        self._drop_stale_cells()
        n_prompt_cells = self.engine.cache.n_cells() + len(tokens)
        reserve = self.reserve()
        fits = self.engine.room() - reserve >= len(tokens)
        chunk = self.scoring.n_batch if fits else self._piece_size(reserve)  # pieces matter only between evictions
        starts = list(range(0, len(tokens), chunk))
        for i, start in enumerate(starts):
            piece = tokens[start:start + chunk]
            # evictions before the whole prompt is in decide per cell; the last one at the set granularity.
            # (Measured with KVzip, a 3K context in 1K cells at keep 0.2: per-head evictions at every piece lost
            # all three facts, per-cell ones kept them.)
            self._make_room(len(piece), slack=False, granularity="token")
            is_last = i == len(starts) - 1
            next_len = 0 if is_last else min(chunk, len(tokens) - starts[i + 1])
            if policy.scores_prompt and (is_last or self.engine.room() - reserve < len(piece) + next_len):
                # an eviction follows this piece: its last tokens may observe
                policy.observe_prompt(self.scoring, self.host.n_tokens + len(piece))
            self._decode(piece, prompt=True)
            self.scoring.report("prefill", start + len(piece), len(tokens))
        # leave room for the observation window (or the scoring decodes) of a later, decode-time eviction
        self.evict_to(self.engine.keep_budget(settings, self.protected_head, n_prompt_cells,
                                              cap_free=self.window + 2 + reserve))
        self.scoring.stop()
        self._decode_budget = None
        self._budget_set = True
        policy.begin_decode()

    def _piece_size(self, reserve: int) -> int:
        assert self.settings is not None and self.policy is not None
        room = self.n_ctx - self.protected_head - self.settings.window - 1 - reserve
        piece = self.policy.prefill_piece(self.scoring) or self.scoring.n_batch
        return max(1, min(piece, room // 2))

    def _make_room(self, n_new: int, slack: bool = True, granularity: str | None = None) -> None:
        """Evict before decoding ``n_new`` tokens if they would not fit in the n_ctx cells (less the policy's
        reserve; in every tier of a tiered cache)."""
        reserve = self.reserve()
        if self.engine.room() - reserve >= n_new:
            return
        assert self.settings is not None
        # only make room: the budget is applied once the whole prompt is known (a query-aware policy sees the
        # question last). While decoding, a little slack keeps it from evicting at every step.
        n_slack = min((self.n_ctx - reserve) // 8, 256) if slack else 0
        n_protected = self.protected_head + self.settings.window
        self.evict_to(np.maximum(self.engine.keep_leaving(n_new + reserve + n_slack), n_protected + 1), granularity)
        if self.engine.room() - reserve < n_new:
            raise ValueError(f"cannot fit {n_new} new tokens into {self.n_ctx - reserve} cells with kv_sink + "
                             f"kv_window = {n_protected} protected; use a larger n_ctx")

    def _decode(self, tokens: list[int], prompt: bool = False) -> None:
        """Decode ``tokens``; a policy that observes decoding is shown their attention over the cells (a prompt's
        only if the policy does not score prompts its own way)."""
        policy = self.policy
        assert policy is not None
        if not policy.observes_decode or (prompt and policy.scores_prompt):
            return self.host.decode_tokens(tokens)
        position = self.host.n_tokens
        # over one query, any reduction of the rows is that query's: take the heads' own, so that the tap reduces
        # both in its graph (and the graph of one decode step is reused at the next)
        rows = policy.decode_heads if len(tokens) == 1 else "mean"
        self.scoring.observe(position, position + len(tokens), TapSpec(rows=rows, heads=policy.decode_heads))
        try:
            self.host.decode_tokens(tokens)
            attention = self.scoring.observed(scratch=True)  # observe_step reads it, keeps a copy if anything
        finally:
            self.scoring.stop()
        if attention is not None:
            start = time.perf_counter()
            policy.observe_step(attention, self.engine.cache.positions(), len(tokens))
            self.engine.stats.observe_s += time.perf_counter() - start
        return None

    def _decode_and_evict_every(self, tokens: list[int]) -> None:
        """Decode ``tokens`` (generation); with ``kv_evict_every`` = W, bring the cache back to the decode budget
        after every W decoded tokens."""
        settings = self.settings
        assert settings is not None
        if self._decode_budget is None:
            # kv_budget, or else the cells the cache holds when decoding begins after the prompt's eviction; with
            # no prompt evicted (tokens decoded one call after another, a conversation's turns say), the whole
            # context: only making room for new tokens evicts (_make_room)
            held = self.engine.cache.n_cells() if self._budget_set else self.n_ctx
            self._decode_budget = max(settings.budget or held, self.protected_head + settings.window + 1)
        self._decode(tokens)
        if settings.evict_every is None:
            return
        self._steps += len(tokens)
        if self._steps >= settings.evict_every:
            self._steps = 0
            if self.engine.cache.n_cells() > self._decode_budget:
                self.evict_to(self._decode_budget, reuse_holes=True)

    def evict_to(self, n_keep: int | npt.NDArray[np.int64], granularity: str | None = None,
                 reuse_holes: bool = False) -> None:
        """Score the cells and keep ``n_keep`` of them (the protected ones among them; per tier for a tiered
        cache). ``reuse_holes``: at token granularity, leave the freed cells for the next tokens to fill when
        they are few (no compaction)."""
        if not self.engine.needs_eviction(n_keep):
            return
        positions = self.engine.cache.positions()
        settings, policy = self.settings, self.policy
        assert settings is not None and policy is not None
        t0 = time.perf_counter()
        try:
            scores = policy.score(self.scoring)
        finally:
            self.scoring.finish()
        self.last_scores = {"positions": positions, "scores": scores}
        layout = self.engine.head_positions(positions)
        if layout is not None:
            self.last_scores["head_positions"] = layout
        if self.tiered:
            # scores per (layer, KV head, token): each tier selects among its own heads' tokens, per head unless
            # token granularity is asked for (the profile's budgets are per head)
            per_head = (granularity or (settings.granularity if settings.granularity_given else "head")) == "head"
            if scores.ndim == 1:
                scores = np.broadcast_to(scores, (self.engine.n_layer, self.engine.n_head_kv, scores.size))
            score_s = time.perf_counter() - t0
            self.scoring.stop()
            self.engine.evict(positions, scores, n_keep, self._protected(positions.size), score_s=score_s,
                              states=policy.cell_states(), per_head=per_head)
            self.lossy = True
            return
        granularity = granularity or settings.granularity
        if scores.ndim == 3 and granularity == "token":
            # one decision per cell: the max over layers and heads
            scores = reduce_groups(scores.reshape(-1, positions.size), scores.shape[0] * scores.shape[1], "max")[0]
        score_s = time.perf_counter() - t0
        protect = self._protected(positions.size)
        self.scoring.stop()  # the scores follow cell indices, which the eviction changes
        compact = True
        if reuse_holes and scores.ndim == 1:
            # holes are refilled by the next tokens (llama.cpp's slot search restarts at the first free cell
            # once enough cells before its head are free): compact only when they would outnumber the tokens
            # decoded before the next eviction
            compact = positions.size - n_keep > (settings.evict_every or 1)
        self.engine.evict(positions, scores, n_keep, protect, score_s=score_s, states=policy.cell_states(),
                          compact=compact)
        self.lossy = True

    def _protected(self, n_cells: int) -> npt.NDArray[np.bool_]:
        """The cells never evicted: the sinks or the template's head, the recent window, the newest."""
        assert self.settings is not None
        protect = np.zeros(n_cells, dtype=bool)
        protect[:self.protected_head] = True
        protect[max(0, n_cells - self.settings.window):] = True
        protect[-1] = True
        return protect

    def shift(self, p0: int, p1: int, delta: int) -> None:
        """Move the cached tokens at positions [p0, p1) by ``delta`` (llama.cpp's K-shift); the token ids follow.
        ValueError, with nothing changed, where llama.cpp would refuse or the result would be wrong: a cache that
        can not shift, a range with a head-mixed cell in it (it has no single position), or positions that would
        land below 0 or on positions the cache holds outside the range."""
        for name, value in (("delta", delta), ("p0", p0), ("p1", p1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if not 0 <= p0 < p1 or delta == 0:
            raise ValueError(f"kv_shift needs 0 <= p0 < p1 and delta != 0, got p0={p0}, p1={p1}, delta={delta}")
        p0, p1, delta = int(p0), int(p1), int(delta)
        memory = self.engine.cache.memory
        if not llama_cpp_api.llama_memory_can_shift(memory):
            raise ValueError("this model's cache can not shift positions")
        mixed_tokens = self.engine.mixed_tokens()
        n_mixed = self.engine.cache.n_mixed(p0, p1) + int(((mixed_tokens >= p0) & (mixed_tokens < p1)).sum())
        if n_mixed:
            raise ValueError(f"positions [{p0}, {p1}) hold tokens of cells that a per-head eviction filled with "
                             "different tokens per KV head; such cells have no single position to shift")
        positions = self.engine.cache.positions()
        inside = (positions >= p0) & (positions < p1)
        moved = positions[inside] + delta
        if moved.size and moved.min() < 0:
            raise ValueError(f"shifting [{p0}, {p1}) by {delta} would move position {int(positions[inside].min())} "
                             "below 0")
        collide = np.intersect1d(moved, positions[~inside])
        if collide.size:
            raise ValueError(f"shifting [{p0}, {p1}) by {delta} would put tokens on positions the cache holds "
                             f"(e.g. {int(collide[0])}): remove those first")
        llama_cpp_api.llama_memory_seq_add(memory, self.host.seq_id, p0, p1, delta)
        n_tokens = self.host.n_tokens
        ids = self.host.token_ids()
        moved_ids = ids[p0:min(p1, n_tokens)].copy()
        end = p0 + delta + moved_ids.size
        self.host.grow(end)
        self.host.token_ids()[p0 + delta:end] = moved_ids
        if p1 >= n_tokens:
            self.host.n_tokens = end  # the sequence's end moved with the range
        self.engine.shift_layout(p0, p1, delta)
        self.lossy = True

    # --- what happened ------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Cells before/after the last eviction, attention window, bytes freed, timings, KV bytes now/allocated."""
        stats = self.engine.stats.as_dict()
        stats["policy"] = self.settings.policy_name if self.settings else None
        if not self.evictable:   # a recurrent or hybrid model: no cells to count (eviction is refused there)
            stats.update(cells_now=None, attended_now=None, kv_bytes_now=None, kv_bytes_allocated=None)
            return stats
        stats["cells_now"] = self.engine.cache.n_cells()
        stats["attended_now"] = self.engine.cache.n_attended()
        # what the cache's cells hold now, and what llama.cpp allocated
        stats["kv_bytes_now"], stats["kv_bytes_allocated"] = self.engine.kv_bytes()
        if self.tiered:
            stats["tier_cells_now"] = self.engine.tier_cells().tolist()
            stats["tier_cells"] = list(self.engine.layout.n_cells)
        return stats
