"""The scoring context: what a prefill-time policy scores a sequence's cells with.

A policy may
  - observe the sequence's own next tokens with the attention tap (SnapKV: the prompt's last window), or
  - decode tokens *or* embeddings at scratch positions after the context, in the same sequence or in a scratch
    sequence that shares the context's cells, with the tap on over those rows (KVzip's reconstruction), and
    optionally with a LoRA adapter active for that decode only (LookaheadKV).
Every scratch cell is removed again right after its decode and the adapter switched back; ``finish()`` then
gives llama-cpp-python back what it expects: the logits of the sequence's last token (a scratch decode replaced
them), with ``n_tokens`` and ``input_ids`` untouched.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from ._native import llama_cpp_api
from .engine import KVCacheView
from .tap import AttentionTap

if TYPE_CHECKING:
    from .chat import ChatTemplate
    from .tiers import TieredEngine

POS_END = 2**31 - 1  # an open end for the tap's position range

# (stage, tokens done, tokens in all) as a prompt is prefilled ("prefill") and scored ("reconstruction", ...)
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TapSpec:
    """How the tap reduces the observed queries (``rows``) and the query heads of each KV group (``heads``):
    "max" or "mean"."""

    rows: str = "mean"
    heads: str = "mean"


class ScoringHost(Protocol):
    """The sequence a scoring context works on (``kvgguf.Llama`` provides one; tests may provide raw ones)."""

    ctx: ctypes.c_void_p            # the llama_context
    model: ctypes.c_void_p          # its llama_model
    seq_id: int
    offloaded: bool                 # the model runs on a GPU (scoring may use larger batches there)
    n_tokens: int                   # tokens decoded so far; the next one goes to this position

    def token_ids(self) -> npt.NDArray[np.intc]:
        """The ids of the tokens decoded so far, one per position."""

    def decode_tokens(self, tokens: list[int]) -> None:
        """Decode ``tokens`` as the sequence's next ones (the host records them and their logits)."""

    def grow(self, n_positions: int) -> None:
        """Make ``token_ids()`` long enough for ``n_positions`` positions."""

    def memory_replaced(self) -> None:
        """The context's KV cache was replaced (a tiered cache, or the plain one again): handles to the old one
        that the host keeps are stale."""

    def lora_adapters(self) -> list[tuple[ctypes.c_void_p, float]]:
        """The LoRA adapters (and scales) the host keeps active outside scoring decodes."""


class LoraAdapter:
    """A LoRA adapter (GGUF, ``general.type = adapter``) loaded for one model, to be switched on for chosen
    scoring decodes only. Owns the llama.cpp adapter: ``close()`` frees it (the model frees it too)."""

    def __init__(self, model: ctypes.c_void_p, path: str | os.PathLike[str], scale: float = 1.0) -> None:
        if not os.path.isfile(path):
            raise ValueError(f"LoRA adapter {str(path)!r} is not a file")
        self.path = str(path)
        self.scale = float(scale)
        self.adapter = llama_cpp_api.llama_adapter_lora_init(model, self.path.encode())
        if not self.adapter:
            raise ValueError(f"{self.path!r} is not a LoRA adapter for this model (llama.cpp refused it)")

    def close(self) -> None:
        if self.adapter:
            llama_cpp_api.llama_adapter_lora_free(self.adapter)
            self.adapter = None


class ScoringContext:
    """Decodes and observations a policy scores one sequence's cells with (see the module docstring)."""

    def __init__(self, host: ScoringHost, n_layer: int, n_head_kv: int, chat: ChatTemplate | None = None) -> None:
        self.host = host
        self.n_layer = n_layer
        self.n_head_kv = n_head_kv
        self.n_embd = llama_cpp_api.llama_model_n_embd(host.model)
        self.chat = chat
        self.cache = KVCacheView(host.ctx, host.seq_id)
        self.tap = AttentionTap(host.ctx, n_layer, n_head_kv)
        # a tiered KV cache (kvgguf.tiers): cells are then the tiers' tokens, scores per (layer, KV head, token)
        self.tiers: TieredEngine | None = None
        self.protected_head = 0   # the first cells that are the chat template's head (set by the controller)
        self.progress: ProgressCallback | None = None  # told how far a prefill and its scoring are
        self._observing = False
        self._logits_stale = False
        self._batch: llama_cpp_api.llama_batch | None = None
        self._batch_size = 0

    def report(self, stage: str, done: int, total: int) -> None:
        """Tell ``progress`` (if set) that ``done`` of the ``total`` tokens of ``stage`` are decoded."""
        if self.progress is not None:
            self.progress(stage, done, total)

    # --- what a policy may read ---------------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        """Cells of the context's KV cache (of its smallest tier, for a tiered one)."""
        if self.tiers is not None:
            return int(self.tiers.capacity.min())
        return llama_cpp_api.llama_n_ctx(self.host.ctx)

    def room(self) -> int:
        """Rows a scratch decode (or the sequence's next tokens) can add before the cache (a tier) is full."""
        if self.tiers is not None:
            return self.tiers.room()
        return self.n_ctx - self.cache.n_cells()

    @property
    def n_batch(self) -> int:
        return llama_cpp_api.llama_n_batch(self.host.ctx)

    @property
    def offloaded(self) -> bool:
        return self.host.offloaded

    @property
    def n_tokens(self) -> int:
        """Tokens of the sequence so far (its positions are below this)."""
        return self.host.n_tokens

    def tokens(self) -> npt.NDArray[np.intc]:
        """The sequence's token ids, one per position."""
        return self.host.token_ids()

    def positions(self) -> npt.NDArray[np.int32]:
        """The positions the sequence's cells hold, ascending: the order of every score array (a tiered cache:
        the tokens some head of some tier holds)."""
        if self.tiers is not None:
            return self.tiers.positions()
        return self.cache.positions()

    def _tap_scores(self, seq_id: int, positions: npt.NDArray[np.int32] | None = None) -> npt.NDArray[np.float32]:
        """The tap's scores of the sequence's cells; for a tiered cache, of the tokens ``positions`` (read every
        tier's cells, ``-inf`` where a head does not hold a token)."""
        if self.tiers is None:
            return self.tap.scores(seq_id)
        tier_scores = [self.tap.scores(seq_id, tier=t) for t in range(self.tiers.layout.n_tiers)]
        return self.tiers.union_scores(tier_scores, self.positions() if positions is None else positions)

    def token_bos(self) -> int:
        return llama_cpp_api.llama_vocab_bos(llama_cpp_api.llama_model_get_vocab(self.host.model))

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """``text`` as token ids (no BOS)."""
        raw = text.encode()
        vocab = llama_cpp_api.llama_model_get_vocab(self.host.model)
        buffer = (llama_cpp_api.llama_token * (len(raw) + 16))()
        n = llama_cpp_api.llama_tokenize(vocab, raw, len(raw), buffer, len(buffer), False, special)
        if n < 0:
            buffer = (llama_cpp_api.llama_token * -n)()
            n = llama_cpp_api.llama_tokenize(vocab, raw, len(raw), buffer, len(buffer), False, special)
        return list(buffer[:n])

    # --- observing the sequence's own decodes ------------------------------------------------------------------

    def observe(self, p0: int, p1: int, spec: TapSpec) -> None:
        """From now on the tap accumulates the attention that the sequence's tokens at positions [p0, p1) pay to
        the cells, until ``observed()`` is read and ``stop()`` called (an eviction stops it: its scores follow cell
        indices)."""
        self.tap.start(self.host.seq_id, p0, p1, spec.rows, spec.heads)
        self._observing = True

    @property
    def observing(self) -> bool:
        return self._observing

    def observed(self, scratch: bool = False) -> npt.NDArray[np.float32] | None:
        """[n_layer, n_head_kv, n_cells] gathered since ``observe``; None if no observed query was decoded.
        ``scratch``: in the tap's memory, valid until the next scratch read (``AttentionTap.scores``)."""
        if not self._observing or self.tap.n_rows() == 0:
            return None
        if scratch and self.tiers is None:
            return self.tap.scores(self.host.seq_id, scratch=True)
        return self._tap_scores(self.host.seq_id)

    def stop(self) -> None:
        if self._observing:
            self.tap.stop()
            self._observing = False

    # --- scratch decodes ----------------------------------------------------------------------------------------

    def decode(self, tokens: Sequence[int] | None = None, *, embeddings: npt.ArrayLike | None = None,
               tap: TapSpec | None = None, tap_rows: range | None = None, adapter: LoraAdapter | None = None,
               batch: int | None = None, scratch_sequence: bool = False) -> npt.NDArray[np.float32] | None:
        """Decode ``tokens`` (or ``embeddings``, [n, n_embd]) at the positions after the sequence's last token, in
        decodes of ``batch`` (default n_batch), then remove their cells again.

        With ``tap``, the decoded rows ``tap_rows`` (a range of their indices; default all) observe and the
        result is the attention they paid to the sequence's cells, [n_layer, n_head_kv, n_cells] (the scratch
        cells left out). ``adapter`` is active for this decode only. ``scratch_sequence`` decodes into a free
        sequence id that shares the sequence's cells (the context needs n_seq_max >= 2) instead of the sequence
        itself. Call ``finish()`` after the last scratch decode."""
        if self._observing:
            raise RuntimeError("a scratch decode while the tap observes the sequence's own tokens")
        if (tokens is None) == (embeddings is None):
            raise ValueError("decode() takes tokens or embeddings")
        rows = np.ascontiguousarray(embeddings, dtype=np.float32) if embeddings is not None else None
        if rows is not None and (rows.ndim != 2 or rows.shape[1] != self.n_embd):
            raise ValueError(f"embeddings must have shape [n, {self.n_embd}], got {list(rows.shape)}")
        n = len(tokens) if tokens is not None else rows.shape[0]
        if n == 0:
            return None
        batch = batch or self.n_batch
        if not 1 <= batch <= self.n_batch:
            raise ValueError(f"batch must be in [1, n_batch={self.n_batch}], got {batch}")
        rows_tapped = tap_rows if tap_rows is not None else range(n)
        if rows_tapped.step != 1 or not 0 <= rows_tapped.start < rows_tapped.stop <= n:
            raise ValueError(f"tap_rows must be a contiguous range inside the {n} decoded rows, got {tap_rows}")
        ctx, seq = self.host.ctx, self.host.seq_id
        memory = llama_cpp_api.llama_get_memory(ctx)
        if n > self.room():
            raise ValueError(f"a scratch decode of {n} rows does not fit: the cache has room for {self.room()}")
        positions = self.positions() if self.tiers is not None else None
        n_cells = self.cache.n_cells() if self.tiers is None else positions.size
        n_past = self.host.n_tokens
        if scratch_sequence:
            seq = self._scratch_sequence()
            llama_cpp_api.llama_memory_seq_cp(memory, self.host.seq_id, seq, -1, -1)
        scores = None
        try:
            if tap is not None:
                self.tap.start(seq, n_past + rows_tapped.start, n_past + rows_tapped.stop, tap.rows, tap.heads)
            if adapter is not None:
                self._set_adapters([(adapter.adapter, adapter.scale)])
            for start in range(0, n, batch):
                end = min(n, start + batch)
                if rows is not None:
                    self._decode_embeddings(rows[start:end], n_past + start, seq)
                else:
                    self._decode_tokens(tokens[start:end], n_past + start, seq)
            if tap is not None:
                if self.tiers is None:
                    scores = self.tap.scores(seq)[:, :, :n_cells]
                else:
                    # per tier, its cells in position order: the context's first, the scratch ones last
                    scores = [self.tap.scores(seq, tier=t) for t in range(self.tiers.layout.n_tiers)]
        finally:
            self._logits_stale = True
            if tap is not None:
                self.tap.stop()
            if adapter is not None:
                self._set_adapters(self.host.lora_adapters())
            if scratch_sequence:
                llama_cpp_api.llama_memory_seq_rm(memory, seq, -1, -1)
            else:
                llama_cpp_api.llama_memory_seq_rm(memory, seq, n_past, -1)
        if isinstance(scores, list):
            assert self.tiers is not None and positions is not None
            scores = self.tiers.union_scores(scores, positions)  # the scratch cells are gone again
        return np.ascontiguousarray(scores) if scores is not None else None

    def finish(self) -> None:
        """After scratch decodes: decode the sequence's last token again, so that the logits llama-cpp-python
        samples from are that token's."""
        if not self._logits_stale:
            return
        self._logits_stale = False
        n_done = self.host.n_tokens
        if n_done == 0:
            return
        last = int(self.host.token_ids()[n_done - 1])
        llama_cpp_api.llama_memory_seq_rm(llama_cpp_api.llama_get_memory(self.host.ctx), self.host.seq_id,
                                          n_done - 1, -1)
        self.host.n_tokens = n_done - 1
        self.host.decode_tokens([last])

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp_api.llama_batch_free(self._batch)
            self._batch = None

    def _scratch_sequence(self) -> int:
        n_seq_max = llama_cpp_api.llama_n_seq_max(self.host.ctx)
        if n_seq_max < 2:
            raise ValueError("a scratch sequence needs a context with n_seq_max >= 2")
        return n_seq_max - 1 if self.host.seq_id != n_seq_max - 1 else 0

    def _set_adapters(self, adapters: list[tuple[ctypes.c_void_p, float]]) -> None:
        handles = (llama_cpp_api.llama_adapter_lora_p_ctypes * max(1, len(adapters)))(*[a for a, _ in adapters])
        scales = (ctypes.c_float * max(1, len(adapters)))(*[s for _, s in adapters])
        if llama_cpp_api.llama_set_adapters_lora(self.host.ctx, handles if adapters else None, len(adapters),
                                                 scales if adapters else None):
            raise RuntimeError("llama_set_adapters_lora failed")

    def _token_batch(self, n: int) -> llama_cpp_api.llama_batch:
        if self._batch is None or self._batch_size < n:
            self.close()
            self._batch_size = max(n, self.n_batch)
            self._batch = llama_cpp_api.llama_batch_init(self._batch_size, 0, 1)
        return self._batch

    def _decode_tokens(self, tokens: Sequence[int], pos0: int, seq: int) -> None:
        batch = self._token_batch(len(tokens))
        self._fill(batch, len(tokens), pos0, seq)
        for i, token in enumerate(tokens):
            batch.token[i] = int(token)
        self._run(batch, len(tokens))

    def _decode_embeddings(self, rows: npt.NDArray[np.float32], pos0: int, seq: int) -> None:
        n = rows.shape[0]
        batch = llama_cpp_api.llama_batch_init(n, self.n_embd, 1)
        try:
            self._fill(batch, n, pos0, seq)
            ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            self._run(batch, n)
        finally:
            llama_cpp_api.llama_batch_free(batch)

    @staticmethod
    def _fill(batch: llama_cpp_api.llama_batch, n: int, pos0: int, seq: int) -> None:
        batch.n_tokens = n
        for i in range(n):
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = i == n - 1

    def _run(self, batch: llama_cpp_api.llama_batch, n: int) -> None:
        code = llama_cpp_api.llama_decode(self.host.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode of {n} scoring rows returned {code}")
