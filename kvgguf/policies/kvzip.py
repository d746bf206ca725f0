"""KVzip (Kim et al., 2025): score each cell by how much the model needs it to reconstruct the context.

Query-agnostic: after the context is prefilled (as the start of a user turn), the turn goes on with "Repeat the
previous context exactly.", the chat template closes it and opens the assistant's answer, and the context is
teacher-forced as that answer, in chunks of about 2K tokens (a later chunk's request quotes the last 8 tokens of
the chunk before), as in the reference implementation. The score of a context cell is the maximum attention any
reconstruction query (request or forced token) pays it, over the query heads of its KV group (the tap: rows =
max, heads = max). The reconstruction is decoded after the context in the same sequence, through the scoring
context, and its cells are removed again.

A context longer than the cache is prefilled piece by piece (``prefill_piece`` tokens), each piece reconstructed
and evicted before the next: the cells scored at earlier evictions keep their scores (a ``CellState`` that the
engine maps through every eviction), so only the cells decoded since are reconstructed. Maxing earlier cells
with every later reconstruction too would favour the start of such a context (its cells would see more queries
than the later ones).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..engine import CellState
from ..scoring import ScoringContext, TapSpec
from ..tiers import TierPlan, plan_budget_tiers
from .base import Policy

if TYPE_CHECKING:
    from ..head_profile import HeadProfile

CHUNK_TOKENS = 2048
QUOTED_TOKENS = 8
FIRST_REQUEST = "Repeat the previous context exactly."
NEXT_REQUEST = "Repeat the part of the previous context exactly, starting with"  # then the quoted token ids
MIN_CHUNK = 64  # fewer free cells than this for a reconstruction: the unscored cells rank first instead
BATCH_CPU = 128  # tokens per decode of a reconstruction on the CPU (see reconstruction_batch)
RECONSTRUCTION_TAP = TapSpec(rows="max", heads="max")


@dataclass(frozen=True)
class ReconstructionChunk:
    """One reconstruction step: the chat-formatted request, then the context tokens forced after it."""

    request: list[int]
    forced: list[int]


def reconstruction(context: list[int], chunk_tokens: int, request: Callable[[str, list[int]], list[int]],
                   preceding: list[int] | None = None) -> list[ReconstructionChunk]:
    """The requests and forced tokens that reconstruct ``context`` in chunks of at most ``chunk_tokens``.

    ``request(text, quoted_ids)`` gives the request's tokens: ``text`` and the quoted context tokens, then the
    chat template's end of the user turn and the assistant header. ``preceding``: the context's tokens before
    ``context`` (scored earlier, in a chunked prefill); the first chunk then quotes their end, like any later
    chunk."""
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


class KVzipPolicy(Policy):
    name = "kvzip"
    scores_per_head = True
    # one decision per cell (its max over the heads): ahead of equal per-head budgets in the query-agnostic runs
    # of docs/benchmarks/ (kvzip/, kvzip-compare/), with our scores and with kvpress's alike
    default_granularity = "token"
    decodes_to_score = True
    # the chat template's head is not context: protected, and the reconstruction starts after it (kvpress too)
    protects_template_head = True
    # with a head profile, each KV head keeps its profiled share of the budget, in a tiered cache
    head_profile_use = "optional"
    budget_tiers = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # [n_layer, n_head_kv, n] the scores of the first n cells (those scored at earlier evictions)
        self.known = CellState()
        self._request_len: int | None = None
        self._tier_piece: int | None = None  # the prompt piece a tier plan made room for (plan_tiers)

    # --- sizes --------------------------------------------------------------------------------------------------

    def request(self, scoring: ScoringContext, text: str, quoted: list[int]) -> list[int]:
        """The request, as the context's user turn would go on: a blank line, ``text``, the ``quoted`` token ids,
        then the end of the turn and the assistant header (the teacher-forced context follows)."""
        turn_end = scoring.chat.turn_end() if scoring.chat is not None else scoring.tokenize("\n\n", special=True)
        return scoring.tokenize(f"\n\n{text}") + quoted + turn_end

    def request_len(self, scoring: ScoringContext) -> int:
        """Upper bound of a request's tokens (the chat template, the request, the quote)."""
        if self._request_len is None:
            self._request_len = len(self.request(scoring, NEXT_REQUEST, [0] * QUOTED_TOKENS)) + 8
        return self._request_len

    def prefill_piece(self, scoring: ScoringContext) -> int:
        """Prompt tokens decoded between evictions (each piece is reconstructed at the next one): small, so that
        a context longer than n_ctx leaves most cells to the compressed part before it (in a tiered cache, the
        piece its tiers were planned for)."""
        if scoring.tiers is not None and self._tier_piece is not None:
            return self._tier_piece
        return min(scoring.n_batch, max(MIN_CHUNK, scoring.n_ctx // 8))

    def plan_tiers(self, profile: HeadProfile, scoring: ScoringContext, n_protected: int) -> TierPlan:
        """Tiers for the profile's per-head budgets at the kept ratio (the reference's global selection, with a
        per-model share per head): each tier holds its heads' budget, the protected cells, and room for a
        prompt piece and its reconstruction. A tier smaller than the prompt takes it in pieces, each
        reconstructed and evicted before the next (``prefill_piece``: an eighth of the smallest tier)."""
        n_ctx = scoring.n_ctx
        settings = self.settings
        keep = settings.keep if settings.keep is not None else min(1.0, (settings.budget or n_ctx) / n_ctx)
        n_evictable = max(1, n_ctx - n_protected)
        self._tier_piece = min(scoring.n_batch, max(MIN_CHUNK, n_ctx // 32))
        n_extra = n_protected + 3 * self._tier_piece + self.request_len(scoring) + MIN_CHUNK
        return plan_budget_tiers(profile.budgets(keep, n_evictable), n_evictable, n_ctx, n_extra,
                                 settings.tiers)

    def reserve(self, scoring: ScoringContext) -> int:
        """Cells kept free for a reconstruction: a request and a piece of forced tokens."""
        return self.request_len(scoring) + self.prefill_piece(scoring)

    def check_fits(self, scoring: ScoringContext, n_protected: int) -> None:
        needed = n_protected + self.reserve(scoring) + 2 * MIN_CHUNK
        if needed > scoring.n_ctx:
            raise ValueError(f"kv_eviction='kvzip' keeps {self.reserve(scoring)} cells free for its "
                             f"reconstruction; with kv_sink + kv_window = {n_protected} that leaves too little of "
                             f"n_ctx={scoring.n_ctx}: use n_ctx >= {needed}")

    def reconstruction_batch(self, scoring: ScoringContext) -> int:
        """Tokens per decode call of a reconstruction. Every reconstruction query attends to the whole context,
        so a ubatch's attention probabilities ([cells, tokens, heads], written by the softmax, read by the tap's
        max and by the product with V) are large: on the CPU, 128 rows of them stay in the last-level cache where
        n_batch = 512 rows do not (measured on the default model: the reconstruction ~5% faster at 2K-8K cells,
        64 rows slower again). A GPU takes the context's n_batch."""
        return scoring.n_batch if scoring.offloaded else min(scoring.n_batch, BATCH_CPU)

    # --- scoring ------------------------------------------------------------------------------------------------

    def chunks(self, scoring: ScoringContext, positions: npt.NDArray[np.int32],
               room: int) -> list[ReconstructionChunk]:
        """The reconstruction of the cells at ``positions`` (ascending, not scored yet) in ``room`` cells. The
        context to reconstruct starts after the chat template's head (or a BOS token); those cells are protected
        and not reconstructed."""
        tokens = scoring.tokens()
        start = max(scoring.protected_head, 1 if tokens[0] == scoring.token_bos() else 0)
        forced = positions[positions >= start]
        if forced.size == 0:
            return []
        preceding = tokens[max(start, int(forced[0]) - QUOTED_TOKENS):int(forced[0])].tolist()
        return reconstruction(tokens[forced].tolist(), min(CHUNK_TOKENS, room),
                              lambda text, quoted: self.request(scoring, text, quoted), preceding=preceding)

    def reconstruct(self, scoring: ScoringContext, chunks: list[ReconstructionChunk],
                    observe: Callable[[npt.NDArray[np.float32]], object] | None) -> None:
        """Decode each chunk (its request, then its forced tokens) after the cache's cells, in decodes of
        ``reconstruction_batch`` tokens; its cells are removed again. With ``observe``, every query of the chunk
        (the request's as the forced tokens', as in the reference) observes and ``observe`` gets the scores,
        [n_layer, n_head_kv, cells]; without, this is the reconstruction's forward alone (`kvgguf bench speed`
        times it beside the tapped one). ``scoring.finish()`` restores the logits afterwards (the controller
        calls it after every scoring)."""
        batch = self.reconstruction_batch(scoring)
        total = sum(len(chunk.request) + len(chunk.forced) for chunk in chunks)
        done = 0
        for chunk in chunks:
            observed = scoring.decode(chunk.request + chunk.forced, tap=RECONSTRUCTION_TAP if observe else None,
                                      batch=batch)
            if observe is not None:
                observe(observed)
            done += len(chunk.request) + len(chunk.forced)
            scoring.report("reconstruction", done, total)

    def scoring_forward(self, scoring: ScoringContext) -> None:
        """The reconstruction of every cell of the sequence without the tap: the cost of its forward alone (call
        ``scoring.finish()`` afterwards)."""
        room = scoring.room() - self.request_len(scoring)
        self.reconstruct(scoring, self.chunks(scoring, scoring.positions(), room), observe=None)

    def score(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        """The max attention of the queries that reconstruct the context; the cells scored at earlier evictions
        keep their scores. Where the cache has no room for a reconstruction (a decode-time eviction with no
        reserve left), the unscored cells rank above all others."""
        positions = scoring.positions()
        n_cells = positions.size
        n_known = min(self.known.n_cells, n_cells)
        scores = np.zeros((scoring.n_layer, scoring.n_head_kv, n_cells), dtype=np.float32)
        if n_known:
            scores[:, :, :n_known] = self.known.values[:, :, :n_known]
        if n_known < n_cells:
            room = scoring.room() - self.request_len(scoring)
            if room < MIN_CHUNK:
                if n_known == 0:
                    raise ValueError(f"kvzip has no scores for the {n_cells} cells of this cache and no room to "
                                     f"reconstruct them in n_ctx={scoring.n_ctx}; use a larger n_ctx")
                scores[:, :, n_known:] = np.finfo(np.float32).max
            else:
                chunks = self.chunks(scoring, positions[n_known:], room)
                if chunks:
                    new = scores[:, :, n_known:]
                    self.reconstruct(scoring, chunks,
                                     lambda observed: np.maximum(new, observed[:, :, n_known:n_cells], out=new))
        # the engine keeps the kept cells' scores through the eviction that follows
        self.known.values = scores.copy()
        return scores

    # --- state --------------------------------------------------------------------------------------------------

    def cell_states(self) -> tuple[CellState, ...]:
        return (self.known,)

    def kept_scores(self) -> npt.NDArray[np.float32] | None:
        return self.known.values

    def resume(self, scores: npt.NDArray[np.float32]) -> None:
        self.known.values = scores.copy()
