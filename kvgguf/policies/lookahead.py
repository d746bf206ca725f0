"""LookaheadKV (arXiv 2603.10899): learned lookahead tokens glimpse the attention of the answer to come.

After the prompt is prefilled by the plain model, the module's ``n_lookahead`` embeddings are decoded after it as
one embedding batch with the module's LoRA switched on for that decode only (so the prompt's K/V stay the base
model's, as in training); the attention tap reads their attention to the prompt's cells (mean over the lookahead
rows, mean over the query heads of each KV group), the scratch cells are removed and the adapter is switched
off. Each (layer, KV head)'s scores are normalized over the cells, as the module was trained to predict them,
and max-pooled along the cells (the module's kernel, 7). Query-aware: the question is part of the prompt that
the lookahead tokens see. The module comes from ``kvgguf train-lookahead`` + ``kvgguf convert lookahead``
(``kv_lookahead=``).
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..scores import maxpool1d
from ..scoring import ScoringContext, TapSpec
from .base import Policy

LOOKAHEAD_TAP = TapSpec(rows="mean", heads="mean")


class LookaheadPolicy(Policy):
    name = "lookahead"
    scores_per_head = True
    default_granularity = "head"
    decodes_to_score = True
    uses_lookahead = True

    def _module(self):  # noqa: ANN202
        if self.lookahead is None:
            raise RuntimeError("kv_eviction='lookahead' scores without its module (the controller sets it)")
        return self.lookahead

    def reserve(self, scoring: ScoringContext) -> int:
        """The lookahead rows' scratch cells."""
        return self._module().file.n_lookahead

    def check_fits(self, scoring: ScoringContext, n_protected: int) -> None:
        needed = n_protected + self.reserve(scoring) + 2
        if needed > scoring.n_ctx:
            raise ValueError(f"kv_eviction='lookahead' decodes {self.reserve(scoring)} lookahead rows after the "
                             f"prompt; with kv_sink + kv_window = {n_protected} use n_ctx >= {needed}")

    def attention(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        """The lookahead rows' attention to the sequence's cells, [n_layer, n_head_kv, n_cells], each (layer,
        head) normalized over the cells."""
        module = self._module()
        attention = scoring.decode(embeddings=module.file.embeddings, tap=LOOKAHEAD_TAP, adapter=module.adapter)
        assert attention is not None
        total = attention.sum(axis=-1, keepdims=True)
        return attention / np.maximum(total, np.float32(1e-30))

    def score(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        self.last_attention = self.attention(scoring)
        return maxpool1d(self.last_attention, self._module().file.pool_kernel)

    def scoring_forward(self, scoring: ScoringContext) -> None:
        module = self._module()
        scoring.decode(embeddings=module.file.embeddings, adapter=module.adapter)
