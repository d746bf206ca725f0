"""A prompt policy and a decode-time policy as one: ``kv_eviction="snapkv+lazy"`` (any prompt policy, ``+``, any
policy that evicts while decoding).

The prompt is scored and evicted once by the first (SnapKV, KVzip, LookaheadKV, ...: what it observes or decodes
to score, as alone) to ``kv_keep`` or ``kv_budget``; generation is then followed and evicted by the second
(LazyEviction, H2O, TOVA, StreamingLLM) back to ``kv_budget``, or else to the cells the prompt's eviction kept,
every ``kv_evict_every`` / ``kv_lazy_window`` tokens: a long answer after a long prompt in bounded memory. The
decode-time policy does not observe the prompt (its queries are the prompt policy's to observe); it starts following
the cells that the prompt's eviction kept as new cells of the first decoded step. Its window (``kv_lazy_window``,
``kv_window``) is the recent cells every eviction keeps; the prompt policy observes at least the default
``kv_window`` of the prompt's last tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..scoring import ScoringContext
from .base import Policy

if TYPE_CHECKING:
    from ..engine import CellState
    from ..head_profile import HeadProfile
    from ..settings import EvictionSettings
    from ..tiers import TierPlan


class ComposedPolicy(Policy):
    """Subclassed per pair by ``compose``: ``prompt_class`` evicts the prompt, ``decode_class`` the generation."""

    prompt_class: type[Policy]
    decode_class: type[Policy]
    observes_decode = True
    evicts_while_decoding = True

    def __init__(self, settings: EvictionSettings) -> None:
        from ..settings import DEFAULT_WINDOW

        prompt_settings = dataclasses.replace(settings, window=max(settings.window, DEFAULT_WINDOW))
        self.prompt = self.prompt_class(prompt_settings)
        self.decode = self.decode_class(settings)
        self.decoding = False  # False until the prompt's eviction is done
        super().__init__(settings)

    @property
    def active(self) -> Policy:
        return self.decode if self.decoding else self.prompt

    @property
    def lookahead(self) -> Any:
        return self.prompt.lookahead

    @lookahead.setter
    def lookahead(self, value: Any) -> None:
        if "prompt" in self.__dict__:
            self.prompt.lookahead = value

    @property
    def last_attention(self) -> npt.NDArray[np.float32] | None:
        return self.active.last_attention

    @last_attention.setter
    def last_attention(self, value: npt.NDArray[np.float32] | None) -> None:
        pass  # each part keeps its own

    # --- prefill time: the prompt policy ------------------------------------------------------------------------

    def reserve(self, scoring: ScoringContext) -> int:
        return self.prompt.reserve(scoring)

    def check_fits(self, scoring: ScoringContext, n_protected: int) -> None:
        self.prompt.check_fits(scoring, n_protected)
        self.decode.check_fits(scoring, n_protected)

    def plan_tiers(self, profile: HeadProfile, scoring: ScoringContext, n_protected: int) -> TierPlan | None:
        return None

    def prefill_piece(self, scoring: ScoringContext) -> int | None:
        return self.prompt.prefill_piece(scoring)

    def observe_prompt(self, scoring: ScoringContext, end: int) -> None:
        self.prompt.observe_prompt(scoring, end)

    def scoring_forward(self, scoring: ScoringContext) -> None:
        self.prompt.scoring_forward(scoring)

    def begin_decode(self) -> None:
        self.decoding = True
        self.prompt.reset()  # its scores served the prompt's eviction; the decode-time policy's count from here
        self.decode.begin_decode()

    # --- decode time: the decode-time policy --------------------------------------------------------------------

    def observe_decode(self, scoring: ScoringContext, start: int) -> None:
        self.active.observe_decode(scoring, start)

    def observe_step(self, attention: npt.NDArray[np.float32], positions: npt.NDArray[np.int32],
                     n_queries: int) -> None:
        self.decode.observe_step(attention, positions, n_queries)

    def score(self, scoring: ScoringContext) -> npt.NDArray[np.float32]:
        return self.active.score(scoring)

    # --- state --------------------------------------------------------------------------------------------------

    def cell_states(self) -> tuple[CellState, ...]:
        return self.active.cell_states()

    def kept_scores(self) -> npt.NDArray[np.float32] | None:
        return None if self.decoding else self.prompt.kept_scores()

    def resume(self, scores: npt.NDArray[np.float32]) -> None:
        self.prompt.resume(scores)

    def reset(self) -> None:
        self.prompt.reset()
        self.decode.reset()
        self.decoding = False


@functools.lru_cache(maxsize=None)
def compose(prompt_class: type[Policy], decode_class: type[Policy]) -> type[ComposedPolicy]:
    """The policy class of ``kv_eviction="<prompt>+<decode>"``; ValueError unless the first scores a prompt and
    the second evicts while decoding."""
    name = f"{prompt_class.name}+{decode_class.name}"
    if prompt_class.observes_decode or not prompt_class.scores_prompt:
        raise ValueError(f"kv_eviction={name!r}: {prompt_class.name!r} is no prompt policy (the first of a pair "
                         "scores the prompt: snapkv, kvzip, lookahead, ...)")
    if not decode_class.evicts_while_decoding:
        raise ValueError(f"kv_eviction={name!r}: {decode_class.name!r} does not evict while decoding (the second of "
                         "a pair does: lazy, h2o, tova, streaming)")
    flags = {"name": name, "prompt_class": prompt_class, "decode_class": decode_class,
             "scores_per_head": prompt_class.scores_per_head or decode_class.scores_per_head,
             "default_granularity": decode_class.default_granularity,
             "decodes_to_score": prompt_class.decodes_to_score,
             "protects_template_head": prompt_class.protects_template_head,
             "decode_heads": decode_class.decode_heads,
             "default_evict_every": decode_class.default_evict_every or 1,
             "uses_lookahead": prompt_class.uses_lookahead,
             "tracks_recurrence": decode_class.tracks_recurrence,
             "scores_prompt": True}
    return type(f"Composed[{name}]", (ComposedPolicy,), flags)
