"""SnapKV (Li et al., 2024): the prompt's last tokens observe which earlier tokens matter.

The observation window is the last ``kv_window`` prompt tokens. For each layer and query head, their attention
over the prompt (softmax, causal) is averaged over the window, the query heads of each KV group are averaged,
and the result is max-pooled along positions with kernel 7 so that neighbours of important tokens survive.
Each KV head keeps its own top cells (head-granular) unless token granularity is asked for. When decoding
fills the cache, the tokens decoded from then on observe instead.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..scores import maxpool1d
from ..scoring import POS_END, ScoringContext, TapSpec
from .base import Policy

POOL_KERNEL = 7
OBSERVERS = TapSpec(rows="mean", heads="mean")


class SnapKVPolicy(Policy):
    name = "snapkv"
    scores_per_head = True
    default_granularity = "head"

    def observe_prompt(self, scoring: ScoringContext, end: int) -> None:
        scoring.observe(max(0, end - max(1, self.settings.window)), end, OBSERVERS)

    def observe_decode(self, scoring: ScoringContext, start: int) -> None:
        if not scoring.observing:
            scoring.observe(start, POS_END, OBSERVERS)

    def score(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        attention = scoring.observed()
        if attention is None:
            # the controller lets observers decode before every eviction; refuse rather than evict blindly
            raise RuntimeError("snapkv needs attention scores, but the tap observed no query")
        self.last_attention = attention
        return maxpool1d(attention, POOL_KERNEL)
