"""The policy interface. A policy owns its whole method: what it observes or decodes to score the cells (through
the scoring context), what state it keeps per cell, and the scores it returns; the controller decides when to
evict and the engine evicts.

Prefill-time policies score when the controller asks (after the prompt, between the pieces of a long prompt,
when decoding fills the cache). A policy that sets ``observes_decode`` is also shown the attention that every
decoded token pays the cells (``observe_step``, once per decode call, prompt pieces included) and keeps what it
needs in ``CellState`` arrays, which the engine maps through every eviction.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt

from ..engine import CellState

if TYPE_CHECKING:
    from ..lookahead import LookaheadRuntime
    from ..head_profile import HeadProfile
    from ..scoring import ScoringContext
    from ..settings import EvictionSettings
    from ..tiers import TierPlan


class Policy(ABC):
    """Scores cells; higher means more worth keeping. One subclass per method, registered by name."""

    name: ClassVar[str]
    # True if score() returns [n_layer, n_head_kv, n_cells] (head-granular eviction possible), else [n_cells]
    scores_per_head: ClassVar[bool] = False
    # the selection without a kv_granularity: "head" (each KV head keeps its own cells; needs scores_per_head) or
    # "token" (one decision per cell, on the max over its heads)
    default_granularity: ClassVar[str] = "token"
    # True if the policy scores by decoding scratch rows after the context (it keeps ``reserve`` cells free)
    decodes_to_score: ClassVar[bool] = False
    # True if the chat template's head of a user turn, when the prompt starts with it, is protected like the sinks
    protects_template_head: ClassVar[bool] = False
    # True if the policy is shown every decoded token's attention (observe_step); the tap then runs on the rows
    # of every decode call
    observes_decode: ClassVar[bool] = False
    # how the tap reduces the query heads of a KV group for observe_step ("max" or "mean")
    decode_heads: ClassVar[str] = "mean"
    # kv_evict_every when not given (observes_decode policies)
    default_evict_every: ClassVar[int | None] = None
    # True if the policy can score the cells at any decode step from what it already holds (no scoring decode,
    # no query to observe): kv_evict_every then brings the cache back to the budget while generating. Every
    # observes_decode policy can; so can recency (StreamingLLM)
    evicts_while_decoding: ClassVar[bool] = False
    # True if the policy scores a prompt from its own observation (``observe_prompt``) or scoring decodes; False
    # for those that observe every decoded token instead (the default: not ``observes_decode``)
    scores_prompt: ClassVar[bool] = True
    # how the policy uses a per-model head profile (kvgguf.head_profile): None (not at all), "optional" (with a
    # profile it evicts in a tiered cache, ``plan_tiers``) or "required"
    head_profile_use: ClassVar[str | None] = None
    # True if ``plan_tiers`` groups the profile's per-head budgets into ``settings.tiers`` tiers (kv_tiers)
    budget_tiers: ClassVar[bool] = False
    # True if the policy scores with a trained LookaheadKV module of the model (kv_lookahead): the controller
    # sets ``lookahead`` before the policy scores
    uses_lookahead: ClassVar[bool] = False
    # True if the policy evicts lazily by recurrence (LazyEviction): kv_lazy_window sets its observation window
    # (the recent cells kept, and the tokens between two evictions) and kv_lazy_alpha its attention threshold
    tracks_recurrence: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.observes_decode:
            cls.evicts_while_decoding = True
        if "scores_prompt" not in cls.__dict__:
            cls.scores_prompt = not cls.observes_decode

    def __init__(self, settings: EvictionSettings) -> None:
        self.settings = settings
        self.lookahead: LookaheadRuntime | None = None
        # for policies whose scores are attention: the attention behind the last score(), before pooling,
        # [n_layer, n_head_kv, n_cells] (the share each cell got; `kvgguf bench scores` compares it with the
        # answer's); None for the others
        self.last_attention: npt.NDArray[np.float32] | None = None

    # --- prefill time -------------------------------------------------------------------------------------------

    def reserve(self, scoring: ScoringContext) -> int:
        """Cells the policy needs free in the cache when it scores (scratch decodes); 0 if none."""
        return 0

    def check_fits(self, scoring: ScoringContext, n_protected: int) -> None:
        """ValueError if the policy can not work in this context's cache with ``n_protected`` cells protected."""

    def plan_tiers(self, profile: HeadProfile, scoring: ScoringContext, n_protected: int) -> TierPlan | None:
        """(``head_profile_use`` policies) The tiered KV cache the policy evicts in with ``profile``, for the
        context's ``scoring.n_ctx`` tokens with ``n_protected`` never evicted; None: a plain cache."""
        return None

    def prefill_piece(self, scoring: ScoringContext) -> int | None:
        """Prompt tokens decoded between two evictions of a prompt longer than the cache (None: n_batch)."""
        return None

    def observe_prompt(self, scoring: ScoringContext, end: int) -> None:
        """The sequence's tokens up to position ``end`` are decoded next and an eviction follows them (not
        called for ``observes_decode`` policies, which see every decode)."""

    def begin_decode(self) -> None:
        """The prompt is in and evicted (or a context was restored): what is decoded from now on is generation."""

    def observe_decode(self, scoring: ScoringContext, start: int) -> None:
        """Decoding from position ``start`` on will fill the cache: an eviction follows soon."""

    @abstractmethod
    def score(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        """The scores of the sequence's cells, in ``scoring.positions()`` order."""

    def scoring_forward(self, scoring: ScoringContext) -> None:
        """(``decodes_to_score`` policies) The scratch decodes that scoring every cell of the sequence takes,
        without the tap: the floor of the scoring's cost, which `kvgguf bench speed` times (call ``scoring.finish()``
        afterwards)."""
        raise NotImplementedError(f"{self.name} does not decode to score")

    # --- decode time --------------------------------------------------------------------------------------------

    def observe_step(self, attention: npt.NDArray[np.float32], positions: npt.NDArray[np.int32],
                     n_queries: int) -> None:
        """(``observes_decode`` policies) The attention that the ``n_queries`` tokens of one decode call paid the
        cells at ``positions`` (those tokens' own cells included), [n_layer, n_head_kv, n_cells]: the mean over the
        tokens, the query heads of each KV group reduced by ``decode_heads``. One token per call while
        generating; a prompt piece or a continuation is one call. ``attention`` is the tap's memory, overwritten at
        the next step: keep a copy of what must outlive the call."""

    # --- state --------------------------------------------------------------------------------------------------

    def cell_states(self) -> tuple[CellState, ...]:
        """The per-cell state the engine maps through each eviction."""
        return ()

    def kept_scores(self) -> npt.NDArray[np.float32] | None:
        """Scores of the cells the cache holds, worth saving with a compressed context (None: nothing to save)."""
        return None

    def resume(self, scores: npt.NDArray[np.float32]) -> None:
        """A compressed context made by this policy was restored: its cells have ``scores``."""

    def reset(self) -> None:
        """The cache was cleared: forget every cell."""
        for state in self.cell_states():
            state.clear()
