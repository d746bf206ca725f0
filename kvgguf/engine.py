"""The one eviction engine: select cells from scores -> remove them in one batched call -> compact.

Policies produce scores; this module turns scores and a budget into kept cells, using the functions our patches
add to llama.cpp (``llama_memory_seq_rm_pos``, ``llama_kv_compact``) and libkvgguf's selection, and maps the
policies' per-cell state (``CellState``) through every eviction.
"""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ._native import NativeError, check_kv, libllama, llama_cpp_api
from .scores import select_topk

logger = logging.getLogger(__name__)

_int32_p = ctypes.POINTER(ctypes.c_int32)

EvictionSettingsLike = Any  # kvgguf.settings.EvictionSettings (which imports the policies, which import this)

# bytes per element of the ggml types a KV cache can use (ggml.h: block size / block bytes)
_GGML_TYPE_BYTES = {0: 4.0, 1: 2.0, 30: 2.0, 8: 34 / 32, 2: 18 / 32, 3: 20 / 32, 6: 22 / 32, 7: 24 / 32, 20: 18 / 32}


class KVCacheView:
    """One sequence of a llama.cpp context's KV cache, or of one tier of a tiered cache, through the patched C
    API."""

    def __init__(self, ctx: ctypes.c_void_p, seq_id: int = 0, tier: int | None = None,
                 n_lists: int | None = None) -> None:
        self.ctx = ctx
        self.seq_id = seq_id
        self.tier = tier
        self.n_lists = n_lists  # keep lists compact() takes, one per (layer, KV head) of the cache, if known

    @property
    def memory(self) -> ctypes.c_void_p:
        memory = llama_cpp_api.llama_get_memory(self.ctx)
        if self.tier is None:
            return memory
        tier = libllama.llama_memory_tier(memory, self.tier)
        if not tier:
            raise NativeError(f"the context's KV cache has no tier {self.tier}")
        return tier

    def positions(self) -> npt.NDArray[np.int32]:
        """Positions held by the sequence, ascending (one per cell)."""
        n = check_kv(libllama.llama_memory_seq_positions(self.memory, self.seq_id, None, 0), "seq_positions")
        out = np.empty(n, dtype=np.int32)
        if n:
            check_kv(libllama.llama_memory_seq_positions(self.memory, self.seq_id, out.ctypes.data_as(_int32_p), n),
                     "seq_positions")
        return out

    def n_cells(self) -> int:
        return check_kv(libllama.llama_memory_seq_positions(self.memory, self.seq_id, None, 0), "seq_positions")

    def n_attended(self) -> int:
        """Cells the next batch attends to (used extent, padded)."""
        return check_kv(libllama.llama_memory_n_attended(self.memory, self.seq_id), "n_attended")

    def remove(self, positions: npt.ArrayLike) -> int:
        """Remove positions of the sequence in one batched call; returns the number of cells freed."""
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        return check_kv(
            libllama.llama_memory_seq_rm_pos(self.memory, self.seq_id, pos.ctypes.data_as(_int32_p), pos.size),
            "seq_rm_pos",
        )

    def n_mixed(self, p0: int = -1, p1: int = -1) -> int:
        """Cells with positions in [p0, p1) that hold different tokens per KV head (never shifted)."""
        return check_kv(libllama.llama_memory_seq_n_mixed(self.memory, self.seq_id, p0, p1), "seq_n_mixed")

    def set_mixed(self, positions: npt.ArrayLike) -> int:
        """Mark the cells at ``positions`` as holding different tokens per KV head (after a state load)."""
        pos = np.ascontiguousarray(positions, dtype=np.int32)
        return check_kv(libllama.llama_memory_seq_set_mixed(self.memory, self.seq_id,
                                                            pos.ctypes.data_as(_int32_p), pos.size), "seq_set_mixed")

    def can_compact_per_head(self) -> bool:
        """Whether KV heads may keep different cells (not with ALiBi: its bias needs each cell's one position)."""
        return bool(libllama.llama_memory_can_compact_per_head(self.memory))

    def compact(self, keep: npt.ArrayLike | None = None) -> int:
        """Move kept entries to the front. ``keep``: None (token-level, after remove) or one list of n positions
        per (layer, KV head) of the cache: [n_layer, n_head_kv, n], or for a tier [n_lists, n] with the tier's
        heads layer by layer (``KVTierLayout.lists``)."""
        if keep is None:
            lists, n_keep = None, 0
        else:
            lists = np.ascontiguousarray(keep, dtype=np.int32)
            if lists.ndim != 3 and (self.tier is None or lists.ndim != 2):
                shape = "[n_layer, n_head_kv, n_keep]" if self.tier is None else "[n_lists, n_keep]"
                raise ValueError(f"keep must have shape {shape}, got {lists.shape}")
            n_keep = lists.shape[-1]
            if self.n_lists is not None and lists.size != self.n_lists * n_keep:
                raise ValueError(f"keep must hold one list per (layer, KV head) of the cache, {self.n_lists}; got "
                                 f"{lists.size // max(n_keep, 1)} lists of {n_keep}")
        pointer = None if lists is None else lists.ctypes.data_as(_int32_p)
        if self.tier is None:
            return check_kv(libllama.llama_kv_compact(self.ctx, self.seq_id, pointer, n_keep), "kv_compact")
        return check_kv(libllama.llama_kv_compact_tier(self.ctx, self.tier, self.seq_id, pointer, n_keep),
                        f"kv_compact_tier({self.tier})")


class CellState:
    """A policy's per-cell state: one array whose last axis follows the sequence's cells in position order,
    ``[n_cells]`` (per token) or ``[n_layer, n_head_kv, n_cells]`` (per KV head). The engine keeps it aligned
    through every eviction (each kept cell keeps its value; per head after a head-granular one); cells decoded
    after the array's end are the policy's to ``extend``."""

    def __init__(self, values: npt.NDArray | None = None) -> None:
        self.values = values
        self._buffer: npt.NDArray | None = None  # room to grow into: ``values`` is a view of its first cells

    @property
    def n_cells(self) -> int:
        return 0 if self.values is None else int(self.values.shape[-1])

    def clear(self) -> None:
        self.values = None
        self._buffer = None

    def extend(self, n_cells: int, fill: float = 0.0) -> npt.NDArray:
        """Grow to ``n_cells`` cells, the new ones set to ``fill``; returns the array. A decode step adds a cell
        at a time: the array grows into spare room (a quarter more, at least 64 cells) instead of being copied
        every step."""
        if self.values is None:
            raise ValueError("extend() of an empty CellState: set its values first")
        n_old = self.n_cells
        if n_cells > n_old:
            values, buffer = self.values, self._buffer
            if (buffer is None or values.base is not buffer or buffer.shape[-1] < n_cells
                    or buffer.shape[:-1] != values.shape[:-1] or buffer.dtype != values.dtype):
                capacity = max(n_cells, n_old + max(64, n_old // 4))
                buffer = np.empty(values.shape[:-1] + (capacity,), dtype=values.dtype)
                buffer[..., :n_old] = values
                self._buffer = buffer
            buffer[..., n_old:n_cells] = fill
            self.values = buffer[..., :n_cells]
        return self.values

    def keep(self, kept: npt.NDArray[np.int32], n_cells: int) -> None:
        """The eviction of ``n_cells`` cells kept ``kept`` ([n_keep], or [n_layer, n_head_kv, n_keep] per head)."""
        if self.values is None:
            return
        if self.n_cells != n_cells:
            raise ValueError(f"a CellState of {self.n_cells} cells at an eviction of {n_cells} cells")
        if kept.ndim == 1:
            self.values = np.ascontiguousarray(self.values[..., kept])
        elif self.values.ndim == 3:
            self.values = np.take_along_axis(self.values, kept.astype(np.intp), axis=2)
        else:
            raise ValueError("a per-token CellState can not follow a head-granular eviction")


HISTORY_LIMIT = 1000  # evictions KVStats.history keeps (the most recent)


@dataclass
class KVStats:
    """What eviction did to the cache, cumulative over a ``Llama``'s life (see ``Llama.kv_stats``)."""

    evictions: int = 0
    cells_before: int = 0          # cells of the sequence before the last eviction
    cells_after: int = 0           # ... and after it
    attended_before: int = 0       # attention window (padded n_kv) before the last eviction
    attended_after: int = 0        # ... and after it
    bytes_per_cell: int = 0        # one cell of every layer and KV head
    n_pairs: int = 1               # (layer, KV head) pairs: a cell of a tiered cache's tier spans some of them
    head_cells_freed: int = 0      # over all evictions: (layer, KV head, cell) entries freed
    score_s: float = 0.0
    evict_s: float = 0.0
    compact_s: float = 0.0
    observe_s: float = 0.0         # in the per-step state updates of a policy that observes decoding
    history: list[dict] = field(default_factory=list)  # the last HISTORY_LIMIT evictions, oldest first

    @property
    def cells_freed(self) -> int:
        """Cells freed over all evictions, in whole cells (a tier's cells count for the heads they span)."""
        return self.head_cells_freed // self.n_pairs

    @property
    def bytes_freed(self) -> int:
        return self.head_cells_freed * self.bytes_per_cell // self.n_pairs

    def freed(self, n_cells: int, n_heads: int | None = None) -> None:
        """Count ``n_cells`` freed cells, each spanning ``n_heads`` (layer, KV head) pairs (None: all)."""
        self.head_cells_freed += n_cells * (self.n_pairs if n_heads is None else n_heads)

    def as_dict(self) -> dict:
        out = asdict(self)
        del out["head_cells_freed"], out["n_pairs"]
        out["cells_freed"] = self.cells_freed
        out["bytes_freed"] = self.bytes_freed
        return out


class EvictionEngine:
    """Keeps ``n_keep`` cells of a sequence, chosen from per-cell or per-(layer, head) scores."""

    def __init__(self, cache: KVCacheView, n_layer: int, n_head_kv: int, bytes_per_cell: int) -> None:
        self.cache = cache
        self.n_layer = n_layer
        self.n_head_kv = n_head_kv
        # shared with the tiered engines that replace this one for a while (EvictionController.use_tiers), so
        # the counts run over the model's life whichever cache evicted
        self.stats = KVStats(bytes_per_cell=bytes_per_cell, n_pairs=max(1, n_layer * n_head_kv))
        # after a head-granular eviction: [n_layer, n_head_kv, n] positions of the tokens that the first n cells
        # hold per KV head (cells after them hold their own position in every head); None while token-level
        self._head_layout: npt.NDArray[np.int32] | None = None
        # indices (into the cells before it) that the last eviction kept: [n_layer, n_head_kv, n_keep] per head or
        # [n_keep]; kept cell j of head (il, h) is cell last_kept[il, h, j] (or last_kept[j]) of before
        self.last_kept: npt.NDArray[np.int32] | None = None

    # --- room and targets (a tiered cache's engine, kvgguf.tiers.TieredEngine, answers per tier) ---------------

    @property
    def capacity(self) -> int:
        """Cells of the cache."""
        return int(llama_cpp_api.llama_n_ctx(self.cache.ctx))

    def room(self) -> int:
        """Tokens that fit before the cache is full."""
        return self.capacity - self.cache.n_cells()

    def keep_leaving(self, n_free: int) -> int:
        """Cells to keep so that ``n_free`` more tokens fit."""
        return self.capacity - n_free

    def keep_budget(self, settings: EvictionSettingsLike, n_protected: int, n_cells: int, cap_free: int) -> int:
        """Cells to keep at the settings' budget out of ``n_cells`` (the first ``n_protected`` protected),
        leaving at least ``cap_free`` cells free."""
        return min(dataclasses.replace(settings, sink=n_protected).target_cells(n_cells), self.capacity - cap_free)

    def needs_eviction(self, n_keep: int) -> bool:
        return self.cache.n_cells() > n_keep

    def kv_bytes(self) -> tuple[int, int]:
        """Bytes the sequence's cells hold now, and bytes the cache allocated."""
        return self.cache.n_cells() * self.stats.bytes_per_cell, self.capacity * self.stats.bytes_per_cell

    def layout_state(self) -> npt.NDArray[np.int32] | None:
        """Which token each KV head holds in the head-mixed cells (for a snapshot; None: no such cells)."""
        return self.head_positions(self.cache.positions())

    def restore_layout(self, state: npt.NDArray[np.int32] | None) -> None:
        self.set_head_layout(state)

    def head_positions(self, positions: npt.NDArray[np.int32]) -> npt.NDArray[np.int32] | None:
        """The position each (layer, KV head, cell) holds, for the cells at ``positions``; None when every
        head of a cell holds the cell's own position (no head-granular eviction since ``forget_layout``)."""
        layout = self._head_layout
        if layout is None:
            return None
        n_mixed = layout.shape[2]
        if positions.size < n_mixed:
            raise RuntimeError(f"the cache holds {positions.size} cells, fewer than the {n_mixed} head-mixed ones")
        full = np.empty((self.n_layer, self.n_head_kv, positions.size), dtype=np.int32)
        full[:, :, :n_mixed] = layout
        full[:, :, n_mixed:] = positions[n_mixed:]
        return full

    def set_head_layout(self, layout: npt.NDArray[np.int32] | None) -> None:
        """Say which tokens the first cells hold per head (after restoring a head-mixed cache); None: none.
        llama.cpp's state keeps one position per cell, not which cells are head-mixed: they are marked again
        here, so that llama.cpp never shifts them."""
        if layout is not None and (layout.ndim != 3 or layout.shape[:2] != (self.n_layer, self.n_head_kv)):
            raise ValueError(f"head layout has shape {layout.shape}, expected ({self.n_layer}, {self.n_head_kv}, n)")
        self._head_layout = None if layout is None else np.ascontiguousarray(layout, dtype=np.int32)
        if layout is not None:
            columns = layout.reshape(-1, layout.shape[2])
            mixed = (columns != columns[0]).any(axis=0)
            if mixed.any():
                self.cache.set_mixed(columns[:, mixed].max(axis=0))

    def shift_layout(self, p0: int, p1: int, delta: int) -> None:
        """The tokens at positions [p0, p1) moved by ``delta`` (none of them in a head-mixed cell)."""
        if self._head_layout is not None:
            inside = (self._head_layout >= p0) & (self._head_layout < p1)
            self._head_layout[inside] += delta

    def mixed_tokens(self) -> npt.NDArray[np.int32]:
        """The positions of every token that a head-mixed cell holds in some KV head, ascending."""
        if self._head_layout is None:
            return np.zeros(0, dtype=np.int32)
        columns = self._head_layout.reshape(-1, self._head_layout.shape[2])
        mixed = (columns != columns[0]).any(axis=0)
        return np.unique(columns[:, mixed])

    def forget_layout(self) -> None:
        """The cache was cleared."""
        self._head_layout = None

    def evict(self, positions: npt.NDArray[np.int32], scores: npt.NDArray[np.float32], n_keep: int,
              protect: npt.NDArray[np.bool_], score_s: float = 0.0, states: tuple[CellState, ...] = (),
              compact: bool = True) -> int:
        """Keep ``n_keep`` of the cells at ``positions`` (the sequence's cells, ascending).

        ``scores`` is ``[n_cells]`` (token-level: one decision per cell) or ``[n_layer, n_head_kv, n_cells]``
        (head-granular: each KV head keeps its own ``n_keep`` tokens). Protected cells are kept everywhere.
        ``states`` follow the kept cells. ``compact=False`` (token-level only) leaves the freed cells as holes
        for the next tokens to fill instead of moving the kept rows to the front.
        Returns the number of cells freed.
        """
        n_cells = positions.size
        if n_keep >= n_cells:
            return 0
        head_granular = scores.ndim == 3
        if head_granular and scores.shape != (self.n_layer, self.n_head_kv, n_cells):
            raise ValueError(f"per-head scores have shape {scores.shape}, expected "
                             f"{(self.n_layer, self.n_head_kv, n_cells)}")
        if not head_granular and scores.shape != (n_cells,):
            raise ValueError(f"per-cell scores have shape {scores.shape}, expected ({n_cells},)")

        attended_before = self.cache.n_attended()
        layout_before = self.head_positions(positions)
        t0 = time.perf_counter()
        keep_idx = select_topk(scores, n_keep, protect)
        self.last_kept = keep_idx
        for state in states:
            state.keep(keep_idx, n_cells)
        if head_granular:
            t1 = time.perf_counter()
            freed = self.cache.compact(positions[keep_idx])
            full = layout_before if layout_before is not None else np.broadcast_to(positions, scores.shape)
            self._head_layout = np.take_along_axis(full, keep_idx.astype(np.intp), axis=2).astype(np.int32)
        else:
            if layout_before is not None:
                self._head_layout = np.ascontiguousarray(layout_before[:, :, np.sort(keep_idx)])
            removed = np.ones(n_cells, dtype=bool)
            removed[keep_idx] = False
            freed = self.cache.remove(positions[removed])
            t1 = time.perf_counter()
            if compact:
                freed += self.cache.compact(None)
        t2 = time.perf_counter()

        stats = self.stats
        stats.evictions += 1
        stats.cells_before = n_cells
        stats.cells_after = self.cache.n_cells()
        stats.attended_before = attended_before
        stats.attended_after = self.cache.n_attended()
        stats.freed(freed)
        stats.score_s += score_s
        stats.evict_s += t1 - t0
        stats.compact_s += t2 - t1
        stats.history.append({"cells_before": n_cells, "cells_after": stats.cells_after, "freed": freed,
                              "granularity": "head" if head_granular else "token",
                              "compacted": head_granular or compact})
        if len(stats.history) > HISTORY_LIMIT:  # a long-lived model (a server) keeps the recent ones only
            del stats.history[:len(stats.history) - HISTORY_LIMIT]
        logger.debug("evicted %d of %d cells (%s-level); attention window %d -> %d", freed, n_cells,
                     "head" if head_granular else "token", attended_before, stats.attended_after)
        return freed


def kv_bytes_per_cell(n_layer: int, n_embd_k_gqa: int, n_embd_v_gqa: int, type_k: int, type_v: int) -> int:
    """Bytes one cell occupies over all layers (K and V rows)."""
    try:
        per_layer = n_embd_k_gqa * _GGML_TYPE_BYTES[type_k] + n_embd_v_gqa * _GGML_TYPE_BYTES[type_v]
    except KeyError as err:
        raise ValueError(f"unsupported KV cache type {err.args[0]}") from err
    return int(round(n_layer * per_layer))
