"""StreamingLLM (Xiao et al., 2023): keep the attention sinks and the most recent tokens.

At prefill it evicts once the prompt is in; while generating, when the cache fills, or with ``kv_evict_every``
every that many tokens back to the budget (decode-time StreamingLLM: a fixed cache of sinks + recent cells)."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..scoring import ScoringContext
from .base import Policy


class StreamingPolicy(Policy):
    """Recency is the score: the engine keeps the protected sinks plus the newest cells that fit the budget."""

    name = "streaming"
    evicts_while_decoding = True  # recency needs no attention: kv_evict_every keeps a fixed budget while generating

    def score(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        return scoring.positions().astype(np.float32)
