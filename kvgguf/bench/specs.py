"""The benchmarks' names for an eviction configuration: a policy, ``@head`` / ``@token`` for its granularity, and
``+profile`` for eviction with the model's head profile in a tiered cache (``kvzip+profile``; ``kvzip+tiers2``:
with the profile's budgets in 2 tiers, kv_tiers); a policy that needs a profile (``kvzip-head``) uses it without
the suffix."""
from __future__ import annotations

import re
from typing import Any

from ..policies import POLICIES, Policy
from ..settings import GRANULARITIES, validate_settings

HEAD_PROFILE = "auto"  # a configuration with a profile evicts with the one shipped for the model
PROFILE_SUFFIX = "+profile"
_PROFILE = re.compile(r"\+(?:profile|tiers(?P<tiers>[0-9]+))$")  # +profile, +tiers<N>


def _split_profile(name: str) -> tuple[str, bool, int | None]:
    """The policy part of ``name`` (before ``@``) without its profile suffix, whether it has one, and the tiers
    it asks for: ``kvzip+tiers2@head`` -> ("kvzip", True, 2); ``kvzip+profile`` -> ("kvzip", True, None)."""
    base = name.partition("@")[0]
    match = _PROFILE.search(base)
    if match is None:
        return base, False, None
    tiers = match.group("tiers")
    return base[:match.start()], True, (int(tiers) if tiers is not None else None)


def policy_spec(name: str) -> tuple[str, str | None]:
    """A policy of the command line: ``kvzip`` (its default granularity), ``kvzip@token`` / ``kvzip@head``, and
    ``kvzip+profile`` / ``kvzip+tiers<N>`` (with the model's head profile: a tiered cache); returns (policy,
    granularity or None)."""
    _, at, granularity = name.partition("@")
    base = _split_profile(name)[0]
    if at and base in POLICIES and granularity in GRANULARITIES:
        return base, granularity
    return (base, None) if base in POLICIES else (name, None)


def policy_of(name: str) -> type[Policy]:
    """The policy class the configuration ``name`` runs (``name`` checked by ``check_spec``)."""
    return POLICIES[policy_spec(name)[0]]


def uses_profile(name: str) -> bool:
    """Whether the command line's policy evicts with the model's head profile (``+profile``, or a policy that
    needs one)."""
    base, with_profile, _ = _split_profile(name)
    policy = POLICIES.get(base)
    return with_profile or (policy is not None and policy.head_profile_use == "required")


def eviction_arguments(name: str) -> dict[str, Any]:
    """``Llama`` keyword arguments for the configuration ``name`` (without its budget)."""
    policy, granularity = policy_spec(name)
    return dict(kv_eviction=policy, kv_granularity=granularity,
                kv_head_profile=HEAD_PROFILE if uses_profile(name) else None,
                kv_tiers=_split_profile(name)[2])


def check_spec(name: str, keep: float) -> None:
    """Raise ValueError naming ``name`` (or the ratio) when it is no configuration the benchmarks can run."""
    policy, granularity = policy_spec(name)
    _, with_profile, tiers = _split_profile(name)
    if policy in POLICIES and with_profile and POLICIES[policy].head_profile_use is None:
        raise ValueError(f"unknown policy {name!r}: a policy ({sorted(POLICIES)}), optionally with "
                         f"{PROFILE_SUFFIX!r} or '+tiers<N>' (policies that use a head profile) and "
                         "'@head' / '@token'")
    validate_settings(policy, keep, kv_granularity=granularity, kv_tiers=tiers)  # an unknown policy, by name
