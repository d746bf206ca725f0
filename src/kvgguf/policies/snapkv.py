"""SnapKV (Li et al., 2024): the prompt's last tokens observe which earlier tokens matter.

The observation window is the last ``kv_window`` prompt tokens. For each layer and query head, their attention
over the prompt (softmax, causal) is averaged over the window, the query heads of each KV group are averaged,
and the result is max-pooled along positions with kernel 7 so that neighbours of important tokens survive.
Each KV head keeps its own top cells (head-granular) unless token granularity is asked for.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..scores import maxpool1d
from .base import Policy, ScoreInput

POOL_KERNEL = 7


class SnapKVPolicy(Policy):
    name = "snapkv"
    scores_per_head = True
    default_granularity = "head"
    needs_attention = True
    tap_reduce_rows = "mean"
    tap_reduce_heads = "mean"

    def score(self, inputs: ScoreInput) -> npt.NDArray[np.float32]:
        if inputs.attention is None:
            raise ValueError("snapkv needs the attention tap's scores")
        return maxpool1d(inputs.attention, POOL_KERNEL)
