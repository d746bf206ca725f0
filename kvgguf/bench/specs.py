"""The benchmarks' names for an eviction configuration: a policy, ``@head`` / ``@token`` for its granularity, and
``+profile`` for eviction with the model's head profile in a tiered cache (``kvzip+profile``); a policy that needs
a profile (``kvzip-head``) uses it without the suffix."""
from __future__ import annotations

from typing import Any

from ..policies import POLICIES, Policy
from ..settings import GRANULARITIES, validate_settings

HEAD_PROFILE = "auto"  # a configuration with a profile evicts with the one shipped for the model
PROFILE_SUFFIX = "+profile"


def policy_spec(name: str) -> tuple[str, str | None]:
    """A policy of the command line: ``kvzip`` (its default granularity), ``kvzip@token`` / ``kvzip@head``, and
    ``kvzip+profile`` (with the model's head profile: a tiered cache); returns (policy, granularity or None)."""
    base, at, granularity = name.partition("@")
    base = base.removesuffix(PROFILE_SUFFIX)
    if at and base in POLICIES and granularity in GRANULARITIES:
        return base, granularity
    return (base, None) if base in POLICIES else (name, None)


def policy_of(name: str) -> type[Policy]:
    """The policy class the configuration ``name`` runs (``name`` checked by ``check_spec``)."""
    return POLICIES[policy_spec(name)[0]]


def uses_profile(name: str) -> bool:
    """Whether the command line's policy evicts with the model's head profile (``+profile``, or a policy that
    needs one)."""
    base = name.partition("@")[0]
    policy = POLICIES.get(base.removesuffix(PROFILE_SUFFIX))
    return base.endswith(PROFILE_SUFFIX) or (policy is not None and policy.head_profile_use == "required")


def eviction_arguments(name: str) -> dict[str, Any]:
    """``Llama`` keyword arguments for the configuration ``name`` (without its budget)."""
    policy, granularity = policy_spec(name)
    return dict(kv_eviction=policy, kv_granularity=granularity,
                kv_head_profile=HEAD_PROFILE if uses_profile(name) else None)


def check_spec(name: str, keep: float) -> None:
    """Raise ValueError naming ``name`` (or the ratio) when it is no configuration the benchmarks can run."""
    policy, granularity = policy_spec(name)
    validate_settings(policy, keep, kv_granularity=granularity)
    if policy not in POLICIES or (PROFILE_SUFFIX in name and POLICIES[policy].head_profile_use is None):
        raise ValueError(f"unknown policy {name!r}: a policy ({sorted(POLICIES)}), optionally with "
                         f"{PROFILE_SUFFIX!r} (policies that use a head profile) and '@head' / '@token'")
