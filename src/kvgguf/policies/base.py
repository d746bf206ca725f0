"""The policy interface: a policy looks at the cache and returns scores; the engine does the rest."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt


@dataclass
class ScoreInput:
    """What a policy may look at when it scores the cells of one sequence."""

    positions: npt.NDArray[np.int32]           # [n_cells] positions of the sequence's cells, ascending
    n_layer: int
    n_head_kv: int
    attention: npt.NDArray[np.float32] | None  # [n_layer, n_head_kv, n_cells] from the attention tap, if requested


class Policy(ABC):
    """Scores cells; higher means more worth keeping. One subclass per method, registered by name."""

    name: ClassVar[str]
    # True if score() returns [n_layer, n_head_kv, n_cells] (head-granular eviction possible), else [n_cells]
    scores_per_head: ClassVar[bool] = False
    # the selection without a kv_granularity: "head" (each KV head keeps its own cells; needs scores_per_head) or
    # "token" (one decision per cell, on the max over its heads)
    default_granularity: ClassVar[str] = "token"
    # True if score() needs ScoreInput.attention (the attention tap over the observation window)
    needs_attention: ClassVar[bool] = False
    # True if the observers are a reconstruction of the context (KVzip) instead of the prompt's last window
    observes_reconstruction: ClassVar[bool] = False
    # how the tap reduces the observer queries and the query heads of a KV group ("max" or "mean")
    tap_reduce_rows: ClassVar[str] = "mean"
    tap_reduce_heads: ClassVar[str] = "mean"

    @abstractmethod
    def score(self, inputs: ScoreInput) -> npt.NDArray[np.float32]:
        """Return the scores of the cells in ``inputs.positions`` order."""
