"""StreamingLLM (Xiao et al., 2023): keep the attention sinks and the most recent tokens."""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .base import Policy, ScoreInput


class StreamingPolicy(Policy):
    """Recency is the score: the engine keeps the protected sinks plus the newest cells that fit the budget."""

    name = "streaming"

    def score(self, inputs: ScoreInput) -> npt.NDArray[np.float32]:
        return inputs.positions.astype(np.float32)
