"""StreamingLLM (Xiao et al., 2023): keep the attention sinks and the most recent tokens."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..scoring import ScoringContext
from .base import Policy


class StreamingPolicy(Policy):
    """Recency is the score: the engine keeps the protected sinks plus the newest cells that fit the budget."""

    name = "streaming"

    def score(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        return scoring.positions().astype(np.float32)
