"""Eviction policies by name. A new method is one module here plus one entry in POLICIES."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Policy
from .h2o import H2OPolicy
from .kvzip import KVzipPolicy
from .kvzip_head import KVzipHeadPolicy
from .lazy import LazyEvictionPolicy
from .lookahead import LookaheadPolicy
from .snapkv import SnapKVPolicy
from .streaming import StreamingPolicy
from .tova import TOVAPolicy

POLICIES: dict[str, type[Policy]] = {
    H2OPolicy.name: H2OPolicy,
    KVzipPolicy.name: KVzipPolicy,
    KVzipHeadPolicy.name: KVzipHeadPolicy,
    LazyEvictionPolicy.name: LazyEvictionPolicy,
    LookaheadPolicy.name: LookaheadPolicy,
    SnapKVPolicy.name: SnapKVPolicy,
    StreamingPolicy.name: StreamingPolicy,
    TOVAPolicy.name: TOVAPolicy,
}


if TYPE_CHECKING:
    from ..settings import EvictionSettings


def get_policy(name: str, settings: EvictionSettings) -> Policy:
    """Instantiate the policy registered as ``name``; ValueError names the bad value and the known ones."""
    try:
        policy_class = POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown kv_eviction policy {name!r}; known: {sorted(POLICIES)}") from None
    return policy_class(settings)


__all__ = ["POLICIES", "Policy", "get_policy"]
