"""Eviction policies by name. A new method is one module here plus one entry in POLICIES; ``"<a>+<b>"`` names a
prompt policy composed with a decode-time one (``composed.py``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Policy
from .composed import ComposedPolicy, compose
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


def policy_class(name: str) -> type[Policy]:
    """The class of the policy registered as ``name``, or of the pair ``"<prompt>+<decode>"`` (``compose``);
    ValueError names the bad value and the known ones."""
    if isinstance(name, str) and name.count("+") == 1:
        first, second = name.split("+")
        return compose(policy_class(first), policy_class(second))
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown kv_eviction policy {name!r}; known: {sorted(POLICIES)}, or a prompt policy + a "
                         "decode-time one (e.g. 'snapkv+lazy')") from None


def get_policy(name: str, settings: EvictionSettings) -> Policy:
    """Instantiate the policy ``name`` (``policy_class``); ValueError names the bad value and the known ones."""
    return policy_class(name)(settings)


__all__ = ["POLICIES", "ComposedPolicy", "Policy", "compose", "get_policy", "policy_class"]
