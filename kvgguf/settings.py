"""Validation of the eviction settings at the API edge: bad values raise ValueError naming the value."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .policies import POLICIES, Policy, get_policy, policy_class as find_policy

DEFAULT_KEEP = 0.5
DEFAULT_WINDOW = 32
DEFAULT_SINK = 4
GRANULARITIES = ("token", "head")
# Tiers a head profile's budgets are grouped into (policies that plan budget tiers, kv_tiers): on the default model
# two, three and four answer alike in kvpress (docs/benchmarks/tier-count/); each split layer costs a decode step
# one more attention and a concat, so fewer tiers decode faster
DEFAULT_TIERS = 3
MAX_TIERS = 8
# LazyEviction: the observation window W (recent cells kept; decoded tokens between two evictions) and the
# attention probability that counts as attending. The paper picks W to cover 80% of the recurrence intervals
# measured on its model (175 for Qwen on MATH-500); 1e-4 is its reference port's alpha
DEFAULT_LAZY_WINDOW = 128
DEFAULT_LAZY_ALPHA = 1e-4


@dataclass(frozen=True)
class EvictionSettings:
    """Validated eviction settings. ``keep`` is the fraction of evictable cells kept (kvpress's
    compression_ratio is 1 - keep); ``budget`` is an absolute number of cells; exactly one is set."""

    policy_name: str
    keep: float | None
    budget: int | None
    window: int
    sink: int
    granularity: str
    # decoding: every this many decoded tokens the cache goes back to the budget (policies that observe decoding)
    evict_every: int | None = None
    # False when the granularity is the policy's default (in a tiered cache, eviction is then per head)
    granularity_given: bool = True
    # tiers the head profile's budgets are grouped into (policies with budget_tiers; others ignore it)
    tiers: int = DEFAULT_TIERS
    # the attention probability that counts as attending a cell (policies that track recurrence)
    lazy_alpha: float = DEFAULT_LAZY_ALPHA

    def policy(self) -> Policy:
        """A new instance of the policy, with no cell state yet."""
        return get_policy(self.policy_name, self)

    def target_cells(self, n_cells: int) -> int:
        """Cells to keep out of ``n_cells`` (never fewer than the protected ones, never more than n_cells)."""
        n_protected = min(n_cells, self.sink + self.window)
        if self.budget is not None:
            target = self.budget
        else:
            target = n_protected + math.ceil(self.keep * (n_cells - n_protected))
        return max(min(target, n_cells), n_protected, 1)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _require(policy: str, attribute: str, option: str, what: str) -> None:
    """ValueError naming ``option`` when ``policy`` lacks the class flag ``attribute`` (an option for others)."""
    if not getattr(find_policy(policy), attribute):
        able = sorted(name for name, cls in POLICIES.items() if getattr(cls, attribute))
        raise ValueError(f"{option} needs a policy that {what} (one of {able}); {policy!r} does not")


def validate_settings(kv_eviction: str | None, kv_keep: float | None = None, kv_budget: int | None = None,
                      kv_window: int | None = None, kv_sink: int = DEFAULT_SINK,
                      kv_granularity: str | None = None, kv_evict_every: int | None = None,
                      kv_tiers: int | None = None, kv_lazy_window: int | None = None,
                      kv_lazy_alpha: float | None = None) -> EvictionSettings | None:
    """Check the user's eviction arguments; returns None when eviction is off."""
    if kv_eviction is None:
        if any(value is not None for value in (kv_keep, kv_budget, kv_granularity, kv_evict_every, kv_tiers,
                                               kv_lazy_window, kv_lazy_alpha)):
            raise ValueError("kv_keep / kv_budget / kv_granularity / kv_evict_every / kv_tiers / kv_lazy_window / "
                             f"kv_lazy_alpha need a kv_eviction policy (one of {sorted(POLICIES)})")
        return None
    policy_class = find_policy(kv_eviction)

    if kv_keep is not None and kv_budget is not None:
        raise ValueError(f"give kv_keep or kv_budget, not both (got kv_keep={kv_keep!r}, kv_budget={kv_budget!r})")
    keep: float | None = None
    budget: int | None = None
    if kv_budget is not None:
        budget = _check_int("kv_budget", kv_budget, 1)
    else:
        value = DEFAULT_KEEP if kv_keep is None else kv_keep
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"kv_keep must be a number in (0, 1], got {value!r}")
        if not math.isfinite(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"kv_keep must be in (0, 1] (the fraction of cells kept), got {value!r}")
        keep = float(value)

    lazy_alpha = DEFAULT_LAZY_ALPHA
    if kv_lazy_window is not None or kv_lazy_alpha is not None:
        option = "kv_lazy_window" if kv_lazy_window is not None else "kv_lazy_alpha"
        _require(kv_eviction, "tracks_recurrence", option, "evicts lazily by recurrence")
    if policy_class.tracks_recurrence:
        # W is both the recent cells kept and the decoded tokens between two evictions
        if kv_lazy_window is not None and kv_window is not None and kv_lazy_window != kv_window:
            raise ValueError(f"kv_lazy_window={kv_lazy_window!r} and kv_window={kv_window!r} differ: for "
                             f"kv_eviction={kv_eviction!r} they are the same window; give one")
        if kv_evict_every is not None:
            raise ValueError(f"kv_eviction={kv_eviction!r} evicts every kv_lazy_window tokens; kv_evict_every="
                             f"{kv_evict_every!r} does not apply")
        lazy_window = next(w for w in (kv_lazy_window, kv_window, DEFAULT_LAZY_WINDOW) if w is not None)
        kv_window = kv_evict_every = _check_int("kv_lazy_window", lazy_window, 1)
        if kv_lazy_alpha is not None:
            if isinstance(kv_lazy_alpha, bool) or not isinstance(kv_lazy_alpha, numbers.Real) or not (
                    0.0 < kv_lazy_alpha < 1.0):
                raise ValueError(f"kv_lazy_alpha must be a probability in (0, 1), got {kv_lazy_alpha!r}")
            lazy_alpha = float(kv_lazy_alpha)

    window = _check_int("kv_window", DEFAULT_WINDOW if kv_window is None else kv_window, 0)
    sink = _check_int("kv_sink", kv_sink, 0)
    if budget is not None and budget <= window + sink:
        raise ValueError(f"kv_budget={budget} must exceed the protected cells kv_sink + kv_window = {sink + window}")

    if kv_granularity is None:
        granularity = policy_class.default_granularity
    elif kv_granularity not in GRANULARITIES:
        raise ValueError(f"kv_granularity must be one of {GRANULARITIES}, got {kv_granularity!r}")
    elif kv_granularity == "head" and not policy_class.scores_per_head:
        raise ValueError(f"kv_granularity='head' needs a policy that scores per KV head; {kv_eviction!r} "
                         "scores whole tokens")
    else:
        granularity = kv_granularity

    evict_every = None
    if kv_evict_every is not None:
        _require(kv_eviction, "evicts_while_decoding", "kv_evict_every", "evicts while decoding")
        evict_every = _check_int("kv_evict_every", kv_evict_every, 1)
    elif policy_class.observes_decode:
        evict_every = policy_class.default_evict_every

    tiers = DEFAULT_TIERS
    if kv_tiers is not None:
        _require(kv_eviction, "budget_tiers", "kv_tiers", "groups a head profile's budgets into tiers")
        tiers = _check_int("kv_tiers", kv_tiers, 1)
        if tiers > MAX_TIERS:
            raise ValueError(f"kv_tiers must be <= {MAX_TIERS}, got {kv_tiers!r}")

    return EvictionSettings(policy_name=kv_eviction, keep=keep, budget=budget, window=window, sink=sink,
                            granularity=granularity, evict_every=evict_every,
                            granularity_given=kv_granularity is not None, tiers=tiers, lazy_alpha=lazy_alpha)
