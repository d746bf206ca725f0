"""TOVA, token omission via attention (Oren et al., 2024): a cell is worth what the newest query pays it now.

Each decoded token's attention over the cells (the mean over the query heads of each KV group) replaces the
previous one; an eviction keeps the recent window plus the cells the newest token attended most, per KV head
or, on the max over heads, per token (the default). While generating, the cache goes back to the budget every
``kv_evict_every`` tokens (default 1, as in the paper: a fixed budget); the budget is ``kv_budget``, or else
the cells the prompt's eviction kept.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..engine import CellState
from ..scoring import ScoringContext
from .base import Policy


class TOVAPolicy(Policy):
    name = "tova"
    scores_per_head = True
    default_granularity = "token"
    observes_decode = True
    decode_heads = "mean"
    default_evict_every = 1

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.current = CellState()  # [n_layer, n_head_kv, n_cells] the newest decode's attention

    def observe_step(self, attention: npt.NDArray[np.float32], positions: npt.NDArray[np.int32],
                     n_queries: int) -> None:
        n_cells = attention.shape[-1]
        if self.current.values is None or self.current.n_cells > n_cells:
            self.current.values = attention.copy()
        else:  # grown by this step's cells: into the state's room (attention is the tap's, overwritten next step)
            np.copyto(self.current.extend(n_cells), attention)

    def score(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        n_cells = scoring.cache.n_cells()
        if self.current.values is None:
            # no query observed yet (a restored snapshot): nothing attended
            self.current.values = np.zeros((scoring.n_layer, scoring.n_head_kv, n_cells), dtype=np.float32)
        self.last_attention = self.current.extend(n_cells)
        return self.last_attention.copy()

    def cell_states(self) -> tuple[CellState, ...]:
        return (self.current,)
