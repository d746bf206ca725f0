"""KVzip's head-level, context-independent mode (Kim et al., 2025; DuoAttention, Xiao et al., 2024, alike): the
model's head profile alone decides, and nothing is decoded to score.

The KV heads that KVzip's global selection gives most of the budget to (the profile's ranking, measured once
per model on calibration text, docs/profiles/) keep the whole context; every other head keeps the attention
sinks and a recent window. The two groups live in the two tiers of a tiered KV cache, the small one evicted by
recency after every prompt piece, so compressing a context costs a plain prefill. As many heads keep the context
as make the cache about ``kv_keep`` of a plain one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..scoring import ScoringContext
from ..tiers import TierPlan, plan_full_heads
from .base import Policy

if TYPE_CHECKING:
    from ..head_profile import HeadProfile

PIECE = 256  # prompt tokens per piece in the small tier (between two recency evictions)


class KVzipHeadPolicy(Policy):
    name = "kvzip-head"
    head_profile_use = "required"
    # the chat template's head is kept like the sinks (as kvzip keeps it)
    protects_template_head = True

    def plan_tiers(self, profile: HeadProfile, scoring: ScoringContext, n_protected: int) -> TierPlan:
        settings = self.settings
        n_ctx = scoring.n_ctx
        keep = settings.keep if settings.keep is not None else min(1.0, (settings.budget or n_ctx) / n_ctx)
        piece = min(scoring.n_batch, PIECE)
        shape = (profile.n_layer, profile.n_head_kv)
        return plan_full_heads(profile.ranking, shape, keep, n_ctx, n_protected + 2 * piece + 2)

    def prefill_piece(self, scoring: ScoringContext) -> int:
        return min(scoring.n_batch, PIECE)

    def score(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        # recency: the heads of the small tier keep their newest tokens; the full tier keeps every token
        return scoring.positions().astype(np.float32)
