"""Eviction policies by name. A new method is one module here plus one entry in POLICIES."""
from __future__ import annotations

from .base import Policy, ScoreInput
from .kvzip import KVzipPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy

POLICIES: dict[str, type[Policy]] = {
    KVzipPolicy.name: KVzipPolicy,
    SnapKVPolicy.name: SnapKVPolicy,
    StreamingPolicy.name: StreamingPolicy,
}


def get_policy(name: str) -> Policy:
    """Instantiate the policy registered as ``name``; ValueError names the bad value and the known ones."""
    try:
        return POLICIES[name]()
    except (KeyError, TypeError):
        raise ValueError(f"unknown kv_eviction policy {name!r}; known: {sorted(POLICIES)}") from None


__all__ = ["POLICIES", "Policy", "ScoreInput", "get_policy"]
