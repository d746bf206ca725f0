"""LazyEviction (arXiv 2506.15969): keep the cells whose attention keeps coming back, evict lazily.

In long reasoning, tokens regain attention after long gaps ("importance recurrence"), so evicting what is cold
right now hurts. Per cell and (layer, KV head) this policy tracks, from the attention every decoded token pays
the cells (the max over the query heads of each KV group: a cell stays while any query head still needs it):

- ``TS``: the last step at which the cell was attended with probability >= ``kv_lazy_alpha`` (a new cell: the
  step that decoded it);
- ``MRI``: the longest recurrence interval seen, ``max(MRI, t - TS)`` whenever it is attended again (new: 0).

The step ``t`` is the position of the newest decoded token. As in the reference code, where the prefill is step 0
and each generated token one more, a prompt (or each piece of one longer than the cache) is one step, at its last
position, its queries averaged, and all the cells it adds start there. Every ``kv_lazy_window`` (W) decoded tokens, if the cache holds more than
the budget B, it keeps the W most recent cells and, of the rest, the B - W with the highest
``I = H1 + H2``, per KV head (or per token, on the max over the heads):
``H1 = 2 / (1 + exp(1 + (t - TS) / (MRI + 1e-5)))`` and ``H2 = 0 if MRI == 0 else 2 / (1 + exp(MRI - 1))``
(the reference code's form; the arXiv text writes H1 = 2 sigmoid(-(t - TS) / MRI)). Between evictions the
cache grows to at most B + W cells.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..engine import CellState
from ..scores import lazy_observe
from ..scoring import ScoringContext
from .base import Policy

MRI_EPSILON = 1e-5


def importance(step: int, last_seen: npt.NDArray, recurrence: npt.NDArray) -> npt.NDArray[np.float32]:
    """LazyEviction's I = H1 + H2 of cells last attended at ``last_seen`` with maximum recurrence interval
    ``recurrence``, at ``step``."""
    mri = recurrence.astype(np.float64)
    with np.errstate(over="ignore"):  # exp of a long gap or interval is inf: H1 or H2 -> 0, as it should
        h1 = 2.0 / (1.0 + np.exp(1.0 + (step - last_seen) / (mri + MRI_EPSILON)))
        h2 = np.where(mri == 0, 0.0, 2.0 / (1.0 + np.exp(mri - 1.0)))
    return (h1 + h2).astype(np.float32)


class LazyEvictionPolicy(Policy):
    name = "lazy"
    scores_per_head = True
    default_granularity = "head"
    observes_decode = True
    decode_heads = "max"
    tracks_recurrence = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_seen = CellState()   # [n_layer, n_head_kv, n_cells] TS: the step it was last attended at
        self.recurrence = CellState()  # [n_layer, n_head_kv, n_cells] MRI: the longest interval between two
        self.step = -1                 # the newest decoded token's position

    def observe_step(self, attention: npt.NDArray[np.float32], positions: npt.NDArray[np.int32],
                     n_queries: int) -> None:
        self.step = int(positions[-1])  # cells are in position order: the newest last
        n_old = self.last_seen.n_cells
        if self.last_seen.values is None:
            self.last_seen.values = np.zeros(attention.shape[:2] + (0,), dtype=np.int32)
            self.recurrence.values = np.zeros(attention.shape[:2] + (0,), dtype=np.int32)
        last_seen = self.last_seen.extend(positions.size)
        recurrence = self.recurrence.extend(positions.size)
        last_seen[..., n_old:] = self.step  # new cells are seen at this step (a prompt piece's all at once)
        # the cells attended at >= alpha: MRI = max(MRI, step - TS), TS = step; in place, in one native pass (this
        # runs at every decoded token)
        lazy_observe(attention[..., :n_old], last_seen[..., :n_old], recurrence[..., :n_old], self.step,
                     self.settings.lazy_alpha)

    def score(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        n_cells = scoring.cache.n_cells()
        if self.last_seen.values is None:
            # cells no observed query saw (restored from a snapshot): seen at once, like a prompt, no recurrence
            shape = (scoring.n_layer, scoring.n_head_kv, n_cells)
            self.step = int(scoring.cache.positions().max(initial=0))
            self.last_seen.values = np.full(shape, self.step, dtype=np.int32)
            self.recurrence.values = np.zeros(shape, dtype=np.int32)
        last_seen = self.last_seen.extend(n_cells, fill=self.step)
        return importance(self.step, last_seen, self.recurrence.extend(n_cells))

    def cell_states(self) -> tuple[CellState, ...]:
        return (self.last_seen, self.recurrence)

    def reset(self) -> None:
        super().reset()
        self.step = -1
