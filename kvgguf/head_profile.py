"""Per-model head profiles: how much of a KV budget each (layer, KV head) needs, measured once per model.

KVzip's reference selects over all (layer, head, cell) entries at once, so heads get unequal budgets, and which
heads take the most is a property of the model: the same few pairs on every prompt (../shared/DESIGN.md,
"Granularity"). A profile records, for a grid of kept ratios r, each pair's share of a global top-r selection of
KVzip's scores over calibration contexts (averaged over the contexts), and the pairs' importance ranking.

It is stored with gguf-py as GGUF metadata, in a file of its own (no tensors) or added to a copy of the model's
GGUF, together with the identity of the model it was measured on:

- ``kvgguf.head_profile.version`` (u32), ``.n_layer``, ``.n_head_kv`` (u32)
- ``.ratios`` (f32 array, ascending kept ratios in (0, 1))
- ``.shares`` (f32 array, [ratio][layer][head] flattened; for each ratio the shares sum to 1)
- ``.head_scores`` (f32 array, [layer][head]): KVzip's head-level score, a pair's largest cell score over every
  calibration context (the reference's ``--level head``)
- ``.ranking`` (i32 array, layer * n_head_kv + head, by head score, most important first)
- ``.base.fingerprint`` / ``.base.name`` / ``.base.architecture`` (str), ``.base.n_embd`` / ``.base.n_vocab``
  (u32): the model it was measured on (see ``kvgguf.contexts.ModelIdentity``)
- ``.calibration`` (str, JSON): the command's settings, the calibration texts' source and sizes
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .contexts import ModelIdentity, file_fingerprint
from .gguf_py import gguf_module

logger = logging.getLogger(__name__)

PREFIX = "kvgguf.head_profile."
FORMAT_VERSION = 1
# kept ratios profiled by default: the benchmark's (0.5 / 0.3 / 0.2 / 0.1) and the range around them
DEFAULT_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
PROFILE_FILE_TYPE = "head_profile"  # general.type of a profile file of its own
# profiles that ship with the package (made by `kvgguf profile-heads`, see docs/profiles/)
SHIPPED_DIR = Path(__file__).with_name("profiles")


class HeadProfileError(ValueError):
    """A head profile that can not be used: not one, another format version, inconsistent, or another model's."""


@dataclass(frozen=True)
class HeadProfile:
    """Budget shares per (layer, KV head) at each kept ratio, measured on one model."""

    ratios: npt.NDArray[np.float32]    # [n_ratios] ascending, in (0, 1)
    shares: npt.NDArray[np.float32]    # [n_ratios, n_layer, n_head_kv], each ratio's shares sum to 1
    head_scores: npt.NDArray[np.float32]  # [n_layer, n_head_kv] the largest cell score over the calibration
    ranking: npt.NDArray[np.int32]     # [n_layer * n_head_kv] layer * n_head_kv + head, most important first
    base: ModelIdentity                # the model it was measured on (type_k / type_v unused)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ratios, shares = self.ratios, self.shares
        if ratios.ndim != 1 or ratios.size == 0 or np.any(np.diff(ratios) <= 0) or ratios[0] <= 0 or ratios[-1] >= 1:
            raise HeadProfileError(f"profile ratios must ascend strictly inside (0, 1), got {ratios.tolist()}")
        if shares.shape != (ratios.size, self.base.n_layer, self.base.n_head_kv):
            raise HeadProfileError(f"profile shares have shape {shares.shape}, expected "
                                   f"{(ratios.size, self.base.n_layer, self.base.n_head_kv)}")
        if np.any(shares < 0) or not np.allclose(shares.sum(axis=(1, 2)), 1.0, atol=1e-4):
            raise HeadProfileError("profile shares must be >= 0 and sum to 1 at every ratio")
        if self.head_scores.shape != shares.shape[1:]:
            raise HeadProfileError(f"profile head scores have shape {self.head_scores.shape}, expected "
                                   f"{shares.shape[1:]}")
        if sorted(self.ranking.tolist()) != list(range(self.n_pairs)):
            raise HeadProfileError(f"profile ranking must order the {self.n_pairs} (layer, head) pairs once each")

    @property
    def n_layer(self) -> int:
        return self.base.n_layer

    @property
    def n_head_kv(self) -> int:
        return self.base.n_head_kv

    @property
    def n_pairs(self) -> int:
        return self.n_layer * self.n_head_kv

    # --- use ----------------------------------------------------------------------------------------------------

    def shares_at(self, keep: float) -> npt.NDArray[np.float64]:
        """[n_layer, n_head_kv] budget shares at kept ratio ``keep``: linear between the profiled ratios, the
        nearest profiled one outside them; sums to 1."""
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep!r}")
        flat = self.shares.reshape(self.ratios.size, -1).astype(np.float64)
        interpolated = np.array([np.interp(keep, self.ratios, flat[:, pair]) for pair in range(self.n_pairs)])
        return (interpolated / interpolated.sum()).reshape(self.n_layer, self.n_head_kv)

    def budgets(self, keep: float, n_cells: int) -> npt.NDArray[np.int64]:
        """[n_layer, n_head_kv] cells each pair keeps out of ``n_cells`` evictable ones, so that together they keep
        ``ceil(keep * n_pairs * n_cells)`` entries (a head that would need more than ``n_cells`` keeps them all and
        its excess goes to the others, in proportion to their shares)."""
        if n_cells < 0:
            raise ValueError(f"n_cells must be >= 0, got {n_cells}")
        total = min(math.ceil(keep * self.n_pairs * n_cells), self.n_pairs * n_cells)
        budgets = _water_fill(self.shares_at(keep).ravel(), total, n_cells)
        return budgets.reshape(self.n_layer, self.n_head_kv)

    def check_model(self, identity: ModelIdentity) -> None:
        """HeadProfileError naming both models when this profile was measured on another one."""
        mine = self.base
        for what, theirs, ours in (("file", identity.fingerprint, mine.fingerprint),
                                   ("n_layer", identity.n_layer, mine.n_layer),
                                   ("n_head_kv", identity.n_head_kv, mine.n_head_kv),
                                   ("n_embd", identity.n_embd, mine.n_embd),
                                   ("n_vocab", identity.n_vocab, mine.n_vocab)):
            if theirs != ours:
                raise HeadProfileError(
                    f"the head profile was measured on {mine.name or mine.architecture!r} and does not fit "
                    f"{identity.name or identity.architecture!r}: the model {what} differs ({ours!r} vs {theirs!r})")

    # --- GGUF ---------------------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, tuple[Any, Any]]:
        """The profile's GGUF key-value pairs: key -> (value, gguf.GGUFValueType)."""
        value_type = gguf_module().GGUFValueType
        base = self.base
        return {
            PREFIX + "version": (FORMAT_VERSION, value_type.UINT32),
            PREFIX + "n_layer": (base.n_layer, value_type.UINT32),
            PREFIX + "n_head_kv": (base.n_head_kv, value_type.UINT32),
            PREFIX + "ratios": ([float(r) for r in self.ratios], value_type.ARRAY),
            PREFIX + "shares": ([float(s) for s in self.shares.ravel()], value_type.ARRAY),
            PREFIX + "head_scores": ([float(s) for s in self.head_scores.ravel()], value_type.ARRAY),
            PREFIX + "ranking": ([int(i) for i in self.ranking], value_type.ARRAY),
            PREFIX + "base.fingerprint": (base.fingerprint, value_type.STRING),
            PREFIX + "base.name": (base.name, value_type.STRING),
            PREFIX + "base.architecture": (base.architecture, value_type.STRING),
            PREFIX + "base.n_embd": (base.n_embd, value_type.UINT32),
            PREFIX + "base.n_vocab": (base.n_vocab, value_type.UINT32),
            PREFIX + "calibration": (json.dumps(self.calibration, sort_keys=True), value_type.STRING),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as a GGUF file of its own (metadata only)."""
        gguf = gguf_module()
        path = Path(path)
        writer = gguf.GGUFWriter(str(path), arch=self.base.architecture or "llama")
        writer.add_name(f"{self.base.name or self.base.architecture} head profile")
        writer.add_type(PROFILE_FILE_TYPE)
        self._add_to(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return path

    def save_into_model(self, model: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
        """Write a copy of the GGUF ``model`` with this profile added to its metadata (an earlier profile in it
        is replaced); the tensors are copied as they are."""
        gguf = gguf_module()
        model, path = Path(model), Path(path)
        if model.resolve() == path.resolve():
            raise ValueError(f"write the model with its profile to a new file, not over {model}")
        reader = gguf.GGUFReader(str(model))
        architecture = reader.get_field(gguf.Keys.General.ARCHITECTURE)
        writer = gguf.GGUFWriter(str(path), arch=architecture.contents() if architecture else "llama",
                                 endianess=reader.endianess)
        alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = int(alignment.contents())
        for name, reader_field in reader.fields.items():
            if name == gguf.Keys.General.ARCHITECTURE or name.startswith("GGUF.") or name.startswith(PREFIX):
                continue
            value_type = reader_field.types[0]
            sub_type = reader_field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, reader_field.contents(), value_type, sub_type=sub_type)
        self._add_to(writer)
        for tensor in reader.tensors:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                   tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        writer.close()
        return path

    def _add_to(self, writer: Any) -> None:
        value_type = gguf_module().GGUFValueType
        for key, (value, kind) in self.metadata().items():
            sub_type = None
            if kind == value_type.ARRAY:
                sub_type = value_type.INT32 if key.endswith("ranking") else value_type.FLOAT32
            writer.add_key_value(key, value, kind, sub_type=sub_type)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeadProfile:
        """Read a profile from a profile file or from a model GGUF that carries one. HeadProfileError for a file
        that is not GGUF, has no profile, or has one of another format version."""
        gguf = gguf_module()
        try:
            reader = gguf.GGUFReader(str(path))
        except (OSError, ValueError) as error:
            raise HeadProfileError(f"{path} is not a readable GGUF file: {error}") from error
        values = {name[len(PREFIX):]: reader_field.contents() for name, reader_field in reader.fields.items()
                  if name.startswith(PREFIX)}
        if not values:
            raise HeadProfileError(f"{path} holds no head profile (no {PREFIX}* metadata)")
        if values.get("version") != FORMAT_VERSION:
            raise HeadProfileError(f"{path} holds a head profile of format version {values.get('version')!r}; this "
                                   f"kvgguf reads version {FORMAT_VERSION}")
        try:
            n_layer, n_head_kv = int(values["n_layer"]), int(values["n_head_kv"])
            ratios = np.asarray(values["ratios"], dtype=np.float32)
            base = ModelIdentity(fingerprint=str(values["base.fingerprint"]), name=str(values["base.name"]),
                                 architecture=str(values["base.architecture"]), n_layer=n_layer, n_head_kv=n_head_kv,
                                 n_embd=int(values["base.n_embd"]), n_vocab=int(values["base.n_vocab"]),
                                 type_k=-1, type_v=-1)
            shares = np.asarray(values["shares"], dtype=np.float32)
            if shares.size != ratios.size * n_layer * n_head_kv:
                raise HeadProfileError(f"{path}: {shares.size} shares for {ratios.size} ratios x {n_layer} layers x "
                                       f"{n_head_kv} heads")
            head_scores = np.asarray(values["head_scores"], dtype=np.float32)
            if head_scores.size != n_layer * n_head_kv:
                raise HeadProfileError(f"{path}: {head_scores.size} head scores for {n_layer} layers x "
                                       f"{n_head_kv} heads")
            return cls(ratios=ratios, shares=shares.reshape(ratios.size, n_layer, n_head_kv),
                       head_scores=head_scores.reshape(n_layer, n_head_kv),
                       ranking=np.asarray(values["ranking"], dtype=np.int32), base=base,
                       calibration=json.loads(values.get("calibration") or "{}"))
        except KeyError as missing:
            raise HeadProfileError(f"{path}: the head profile lacks {PREFIX}{missing.args[0]}") from None


AUTO = "auto"  # kv_head_profile: the profile shipped for the model, if any


def resolve_profile(spec: str | os.PathLike[str] | None, model_path: str | os.PathLike[str],
                    identity: ModelIdentity) -> HeadProfile | None:
    """The head profile a ``Llama`` uses: None (no profile), ``"auto"`` (the one shipped for this model file, or
    none) or a path (a profile file, or a model GGUF that carries one), checked against the model."""
    if spec is None:
        return None
    if isinstance(spec, str) and spec == AUTO:
        return shipped_profile(model_path)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"kv_head_profile must be a path, {AUTO!r} or None, got {spec!r}")
    if not os.path.isfile(spec):
        raise ValueError(f"kv_head_profile={str(spec)!r} is not a file")
    profile = HeadProfile.load(spec)
    profile.check_model(identity)
    return profile


def shipped_profile(model_path: str | os.PathLike[str]) -> HeadProfile | None:
    """The profile shipped with the package for the GGUF file at ``model_path`` (matched by its fingerprint), or
    None if none was made for it."""
    fingerprint = file_fingerprint(model_path)
    for path in sorted(SHIPPED_DIR.glob("*.profile.gguf")):
        profile = HeadProfile.load(path)
        if profile.base.fingerprint == fingerprint:
            return profile
    return None


@dataclass(frozen=True)
class Tiers:
    """Per-pair budgets grouped into a few tiers of equal length: what a tiered KV cache holds (every head of a
    tier keeps the same number of cells)."""

    levels: npt.NDArray[np.int64]   # [n_tiers] cells per head in each tier, descending
    tier_of: npt.NDArray[np.int64]  # [n_layer, n_head_kv] each pair's tier

    def budgets(self) -> npt.NDArray[np.int64]:
        """[n_layer, n_head_kv] cells each pair keeps."""
        return self.levels[self.tier_of]


def group_into_tiers(budgets: npt.NDArray[np.integer], n_tiers: int) -> Tiers:
    """Group per-pair budgets into at most ``n_tiers`` tiers: the optimal 1-D k-means split of the sorted budgets
    (least squared change of any pair's budget); a tier's length is its pairs' mean budget, so the tiers hold
    about as many entries as the budgets do."""
    if n_tiers < 1:
        raise ValueError(f"n_tiers must be >= 1, got {n_tiers}")
    flat = np.asarray(budgets, dtype=np.float64).ravel()
    order = np.argsort(-flat, kind="stable")
    values = flat[order]
    n = values.size
    n_tiers = min(n_tiers, n)
    prefix = np.concatenate([[0.0], np.cumsum(values)])
    prefix_sq = np.concatenate([[0.0], np.cumsum(values ** 2)])

    def cost(i: int, j: int) -> float:  # squared error of values[i:j] around their mean
        total = prefix[j] - prefix[i]
        return float(prefix_sq[j] - prefix_sq[i] - total * total / (j - i))

    best = np.full((n_tiers + 1, n + 1), np.inf)
    split = np.zeros((n_tiers + 1, n + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, n_tiers + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                candidate = best[k - 1, i] + cost(i, j)
                if candidate < best[k, j] - 1e-12:
                    best[k, j], split[k, j] = candidate, i
    k = int(np.argmin(best[1:, n])) + 1  # fewer tiers when more would not lower the error
    bounds, j = [], n
    while k > 0:
        i = int(split[k, j])
        bounds.append((i, j))
        j, k = i, k - 1
    bounds.reverse()
    levels = np.array([round(values[i:j].mean()) for i, j in bounds], dtype=np.int64)
    tier_sorted = np.concatenate([np.full(j - i, t) for t, (i, j) in enumerate(bounds)])
    tier_of = np.empty(n, dtype=np.int64)
    tier_of[order] = tier_sorted
    return Tiers(levels=levels, tier_of=tier_of.reshape(np.shape(budgets)))


def _water_fill(shares: npt.NDArray[np.float64], total: int, cap: int) -> npt.NDArray[np.int64]:
    """Integers <= ``cap`` in proportion to ``shares`` that sum to ``total`` (<= cap * len(shares)): capped
    entries give their excess to the others in proportion to their shares; rounding by largest remainders."""
    budgets = np.zeros(shares.size, dtype=np.float64)
    free = np.ones(shares.size, dtype=bool)
    remaining = float(total)
    while remaining > 1e-9 and free.any():
        weights = np.where(free, shares, 0.0)
        if weights.sum() <= 0:
            weights = free.astype(np.float64)
        proposal = budgets + remaining * weights / weights.sum()
        over = free & (proposal >= cap)
        if not over.any():
            budgets = proposal
            break
        remaining -= float((cap - budgets[over]).sum())
        budgets[over] = cap
        free &= ~over
    whole = np.floor(budgets + 1e-9).astype(np.int64)
    short = total - int(whole.sum())
    if short > 0:
        order = np.argsort(-(budgets - whole), kind="stable")
        order = order[whole[order] < cap]
        whole[order[:short]] += 1
    return whole


def global_kept_counts(scores: npt.NDArray[np.float32], keep: float) -> npt.NDArray[np.int64]:
    """[n_layer, n_head_kv] entries each pair holds in the top ``keep`` of all (layer, head, cell) scores
    ([n_layer, n_head_kv, n_cells]); ties at the threshold go to the earlier entries."""
    flat = scores.reshape(-1)
    n_keep = min(flat.size, math.ceil(keep * flat.size))
    kept = np.zeros(flat.size, dtype=bool)
    if n_keep:
        kept[np.argsort(-flat, kind="stable")[:n_keep]] = True
    return kept.reshape(scores.shape).sum(axis=2)


def profile_from_scores(scores: list[npt.NDArray[np.float32]], ratios: tuple[float, ...], base: ModelIdentity,
                        calibration: dict[str, Any]) -> HeadProfile:
    """A profile from the KVzip scores of the evictable cells of several contexts ([n_layer, n_head_kv, n_cells]
    each): each pair's share of the global top-r selection, per context, averaged over the contexts; its head
    score, the largest of its scores over all contexts; the ranking by head score (ties: the earlier pair)."""
    if not scores:
        raise ValueError("a head profile needs the scores of at least one calibration context")
    ratio_array = np.asarray(sorted(ratios), dtype=np.float32)
    shares = np.zeros((ratio_array.size, base.n_layer, base.n_head_kv), dtype=np.float64)
    for context_scores in scores:
        if context_scores.shape[:2] != (base.n_layer, base.n_head_kv):
            raise ValueError(f"scores of shape {context_scores.shape} for a model of {base.n_layer} layers x "
                             f"{base.n_head_kv} KV heads")
        for i, ratio in enumerate(ratio_array):
            counts = global_kept_counts(context_scores, float(ratio))
            shares[i] += counts / max(int(counts.sum()), 1)
    shares /= len(scores)
    head_scores = np.max([context_scores.max(axis=2) for context_scores in scores], axis=0).astype(np.float32)
    ranking = np.argsort(-head_scores.ravel(), kind="stable").astype(np.int32)
    return HeadProfile(ratios=ratio_array, shares=shares.astype(np.float32), head_scores=head_scores,
                       ranking=ranking, base=base, calibration=calibration)
