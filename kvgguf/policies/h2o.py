"""H2O, the heavy-hitter oracle (Zhang et al., 2023): a cell is worth the attention it has received so far.

Every decoded token, prompt and generation alike, adds the attention it pays each cell (the mean over the query
heads of the cell's KV group) to that cell's sum, per (layer, KV head); the sums are this policy's ``CellState``,
kept through every eviction. An eviction keeps the recent window plus the cells with the largest sums, per KV
head or, on the max over heads, per token (the default: with holes reused, an eviction every step then costs no
compaction). While generating, the cache goes back to the budget every ``kv_evict_every`` tokens (default 1, as
in the paper: a fixed budget); the budget is ``kv_budget``, or else the cells the prompt's eviction kept.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..engine import CellState
from ..scoring import ScoringContext
from .base import Policy


class H2OPolicy(Policy):
    name = "h2o"
    scores_per_head = True
    default_granularity = "token"
    observes_decode = True
    decode_heads = "mean"
    default_evict_every = 1

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.received = CellState()  # [n_layer, n_head_kv, n_cells] attention received so far

    def observe_step(self, attention: npt.NDArray[np.float32], positions: npt.NDArray[np.int32],
                     n_queries: int) -> None:
        if self.received.values is None:
            self.received.values = np.zeros_like(attention)
        received = self.received.extend(positions.size)
        if n_queries == 1:
            received += attention  # in place: this runs at every decoded token
        else:
            received += attention * np.float32(n_queries)  # the tap's mean over the queries, back to their sum

    def score(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        n_cells = scoring.cache.n_cells()
        if self.received.values is None:
            # cells that no observed query saw (restored from a snapshot) have received nothing yet
            self.received.values = np.zeros((scoring.n_layer, scoring.n_head_kv, n_cells), dtype=np.float32)
        return self.received.extend(n_cells).copy()

    def cell_states(self) -> tuple[CellState, ...]:
        return (self.received,)
