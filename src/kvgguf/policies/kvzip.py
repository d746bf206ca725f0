"""KVzip (Kim et al., 2025): score each cell by how much the model needs it to reconstruct the context.

Query-agnostic: after the context is prefilled (as the start of a user turn), the turn goes on with "Repeat the
previous context exactly.", the chat template closes it and opens the assistant's answer, and the context is
teacher-forced as that answer, in chunks of about 2K tokens (a later chunk's request quotes the last 8 tokens of
the chunk before), as in the reference implementation. The score of a context cell is the maximum attention any
reconstruction query (request or forced token) pays it, over the query heads of its KV group. The reconstruction
runs after the context in the same sequence and its cells are removed afterwards (``Llama`` does the decoding with
the attention tap, reduce rows = max, heads = max); this module says what to decode.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .base import Policy, ScoreInput

CHUNK_TOKENS = 2048
QUOTED_TOKENS = 8
FIRST_REQUEST = "Repeat the previous context exactly."
NEXT_REQUEST = "Repeat the part of the previous context exactly, starting with"  # then the quoted token ids


@dataclass(frozen=True)
class ReconstructionChunk:
    """One reconstruction step: the chat-formatted request, then the context tokens forced after it."""

    request: list[int]
    forced: list[int]


class KVzipPolicy(Policy):
    name = "kvzip"
    scores_per_head = True
    # one decision per cell (its max over the heads): ahead of equal per-head budgets in the query-agnostic runs
    # of docs/benchmarks/ (kvzip/, kvzip-compare/), with our scores and with kvpress's alike
    default_granularity = "token"
    needs_attention = True
    observes_reconstruction = True
    tap_reduce_rows = "max"
    tap_reduce_heads = "max"

    def reconstruction(self, context: list[int], chunk_tokens: int,
                       request: Callable[[str, list[int]], list[int]],
                       preceding: list[int] | None = None) -> list[ReconstructionChunk]:
        """The requests and forced tokens that reconstruct ``context`` in chunks of at most ``chunk_tokens``.

        ``request(text, quoted_ids)`` gives the request's tokens: ``text`` and the quoted context tokens, then the
        chat template's end of the user turn and the assistant header. ``preceding``: the context's tokens before ``context`` (scored earlier, in a
        chunked prefill); the first chunk then quotes their end, like any later chunk."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        before = list(preceding or [])[-QUOTED_TOKENS:]
        chunks = []
        for start in range(0, len(context), chunk_tokens):
            quoted_ids = (before + context[:start])[-QUOTED_TOKENS:]
            text = NEXT_REQUEST if quoted_ids else FIRST_REQUEST
            chunks.append(ReconstructionChunk(request=request(text, quoted_ids),
                                              forced=context[start:start + chunk_tokens]))
        return chunks

    def score(self, inputs: ScoreInput) -> npt.NDArray[np.float32]:
        if inputs.attention is None:
            raise ValueError("kvzip needs the reconstruction's attention scores")
        return inputs.attention
