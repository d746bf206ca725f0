"""``kvgguf.Llama``: llama_cpp.Llama with KV-cache eviction applied after the prompt is prefilled.

Eviction changes what the cache holds, so the cache stops being a faithful copy of ``input_ids``. Two rules
follow: positions are never renumbered (the next token goes to ``n_tokens``, which may exceed ``n_ctx``), and
the parent's automatic prefix reuse is switched off whenever eviction is on, so a lossy cache is never silently
reused as a token prefix by a later call.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ._native import libllama, llama_cpp, llama_cpp_api
from .context import ChatLayout, CompressedContext, ContextFileError, ModelIdentity, file_fingerprint, read_context_file
from .engine import EvictionEngine, KVCacheView, kv_bytes_per_cell
from .models import check_gguf_file
from .policies import Policy, ScoreInput
from .policies.kvzip import CHUNK_TOKENS, NEXT_REQUEST, QUOTED_TOKENS, KVzipPolicy, ReconstructionChunk
from .scores import reduce_groups
from .settings import DEFAULT_SINK, DEFAULT_WINDOW, EvictionSettings, validate_settings
from .tap import AttentionTap


SEQ_ID = 0  # llama_cpp.Llama decodes everything into sequence 0
POS_END = 2**31 - 1  # an open end for the tap's position range
MIN_RECONSTRUCTION_CHUNK = 64  # fewer free cells than this: KVzip ranks the unscored cells first instead
RECONSTRUCTION_BATCH_CPU = 128  # tokens per decode of a KVzip reconstruction on the CPU (_reconstruction_batch)
CONTEXT_MARK = "\x00kvgguf-context\x00"  # where a compressed context goes when its chat is formatted


def _starts_with(tokens: Sequence[int], prefix: np.ndarray) -> bool:
    return len(tokens) > prefix.size and np.array_equal(np.asarray(tokens[:prefix.size]), prefix)


@dataclass(frozen=True)
class KVSnapshot:
    """What ``Llama.kv_snapshot`` copied: llama.cpp's state of the model's sequence (its cells, K and V rows) and
    the token ids decoded so far."""

    data: bytes
    tokens: np.ndarray
    head_positions: np.ndarray | None = None  # [n_layer, n_head_kv, n] tokens of the head-mixed cells per head


class Llama(llama_cpp.Llama):
    """Drop-in ``llama_cpp.Llama`` with KV-cache eviction.

    Args (in addition to llama_cpp.Llama's):
        kv_eviction: policy name (see ``kvgguf.policies.POLICIES``) or None for no eviction.
        kv_keep: fraction of the evictable prompt cells kept, 0 < r <= 1 (default 0.5 when no budget is given).
        kv_budget: absolute number of cells kept instead of a fraction.
        kv_window: most recent cells that are never evicted (and SnapKV's observation window).
        kv_sink: first cells that are never evicted (attention sinks).
        kv_granularity: "head" (each KV head keeps its own tokens; needs a policy that scores per head) or
            "token" (one decision per token); default: the policy's (``default_granularity``: snapkv head,
            kvzip token).

    With a policy, prompts longer than ``n_ctx`` are prefilled in chunks with eviction between chunks, and
    generation that fills the cache evicts again instead of failing; positions may run up to
    ``max(n_ctx, n_ctx_train)``.
    """

    def __init__(self, model_path: str, *args: Any, kv_eviction: str | None = None, kv_keep: float | None = None,
                 kv_budget: int | None = None, kv_window: int = DEFAULT_WINDOW, kv_sink: int = DEFAULT_SINK,
                 kv_granularity: str | None = None, **kwargs: Any) -> None:
        settings = validate_settings(kv_eviction, kv_keep, kv_budget, kv_window, kv_sink, kv_granularity)
        check_gguf_file(model_path)
        if kwargs.get("vocab_only"):
            # llama-cpp-python still creates a context, which llama.cpp aborts on for a weightless model
            raise ValueError("vocab_only=True is not supported by kvgguf.Llama (it needs a KV cache); use "
                             "llama_cpp.Llama for tokenization only")
        self._kv_settings: EvictionSettings | None = None
        self._kv_policy: Policy | None = None
        self._kv_prompt_pending = False
        self._kv_last_scores: dict[str, np.ndarray] | None = None
        # KVzip: scores of the first cells of the cache, per (layer, KV head, cell) in cell order
        self._kv_cell_scores: np.ndarray | None = None
        # KVzip: the prompt's first tokens that are the chat template's head (protected, not reconstructed: the
        # context to reconstruct starts after them, as in the reference); compress() gives its own head
        self._kv_head = 0
        self._kv_head_hint: int | None = None
        self._kv_default_head: list[int] | None = None
        self._kv_request_len: int | None = None
        self._kv_turn_end: list[int] | None = None
        self._kv_chat_formatter: Jinja2ChatFormatter | None = None
        self._kv_context_chat_handler: Any = None
        self._kv_identity: ModelIdentity | None = None
        self._kv_lossy = False  # the cache is not a copy of input_ids (eviction, or a compressed context)
        self._kv_pending_context: CompressedContext | None = None  # the next generate() starts from it
        super().__init__(model_path, *args, **kwargs)

        cache = KVCacheView(self._ctx.ctx, SEQ_ID)
        n_layer = llama_cpp_api.llama_model_n_layer(self._model.model)
        n_head_kv = llama_cpp_api.llama_model_n_head_kv(self._model.model)
        n_head = llama_cpp_api.llama_model_n_head(self._model.model)
        n_embd = llama_cpp_api.llama_model_n_embd(self._model.model)
        arch = self.metadata.get("general.architecture", "")
        head_k = int(self.metadata.get(f"{arch}.attention.key_length", n_embd // n_head))
        head_v = int(self.metadata.get(f"{arch}.attention.value_length", head_k))
        bytes_per_cell = kv_bytes_per_cell(n_layer, n_head_kv * head_k, n_head_kv * head_v,
                                           int(self.context_params.type_k), int(self.context_params.type_v))
        self._kv_engine = EvictionEngine(cache, n_layer, n_head_kv, bytes_per_cell)
        self._kv_tap = AttentionTap(self._ctx.ctx, n_layer, n_head_kv)
        self._kv_tap_running = False
        self._check_supported(settings)
        self._apply_settings(settings)

    def close(self) -> None:
        # __del__ calls close() even when __init__ raised before the parent set anything up
        if "_stack" in self.__dict__:
            super().close()

    # --- configuration -----------------------------------------------------------------------------------------

    def configure_kv_eviction(self, kv_eviction: str | None, kv_keep: float | None = None,
                              kv_budget: int | None = None, kv_window: int = DEFAULT_WINDOW,
                              kv_sink: int = DEFAULT_SINK, kv_granularity: str | None = None) -> None:
        """Change the eviction settings of a loaded model; on ValueError the old settings stay in force."""
        settings = validate_settings(kv_eviction, kv_keep, kv_budget, kv_window, kv_sink, kv_granularity)
        self._check_supported(settings)
        self._apply_settings(settings)
        self.reset()  # whatever the cache holds was made under other settings

    def _check_supported(self, settings: EvictionSettings | None) -> None:
        if settings is None:
            return
        memory = self._kv_engine.cache.memory
        if libllama.llama_memory_n_attended(memory, SEQ_ID) < 0:
            raise ValueError(f"kv_eviction={settings.policy_name!r} needs a single attention KV cache; this model's "
                             "memory (recurrent, hybrid or sliding-window + full caches) is not supported yet")
        n_ctx = self.n_ctx()
        if settings.budget is not None and settings.budget > n_ctx:
            raise ValueError(f"kv_budget={settings.budget} is larger than n_ctx={n_ctx}")
        if settings.sink + settings.window + 2 > n_ctx:
            raise ValueError(f"kv_sink + kv_window = {settings.sink + settings.window} leaves no room in "
                             f"n_ctx={n_ctx}")
        reserve = self._reconstruction_reserve(settings.policy())
        if reserve and settings.sink + settings.window + reserve + 2 * MIN_RECONSTRUCTION_CHUNK > n_ctx:
            raise ValueError(f"kv_eviction={settings.policy_name!r} keeps {reserve} cells free for its "
                             f"reconstruction; with kv_sink + kv_window = {settings.sink + settings.window} that "
                             f"leaves too little of n_ctx={n_ctx}: use n_ctx >= "
                             f"{settings.sink + settings.window + reserve + 2 * MIN_RECONSTRUCTION_CHUNK}")

    def _apply_settings(self, settings: EvictionSettings | None) -> None:
        self._stop_tap()
        self._kv_settings = settings
        self._kv_policy = settings.policy() if settings else None
        self._kv_last_scores = None
        self._kv_cell_scores = None
        self._kv_prompt_pending = False

    @property
    def kv_settings(self) -> EvictionSettings | None:
        return self._kv_settings

    # With eviction, or a lossy cache restored (a compressed context), the context window (n_ctx cells) no longer
    # bounds the token positions: the parent's prompt-length check and max_tokens arithmetic must see the position
    # limit instead.
    @property
    def _n_ctx(self) -> int:
        n_ctx_cells = self.__dict__["_kv_n_ctx_cells"]
        if (self.__dict__.get("_kv_policy") is None and not self.__dict__.get("_kv_lossy")
                and self.__dict__.get("_kv_pending_context") is None):
            return n_ctx_cells
        return max(n_ctx_cells, self._model.n_ctx_train())

    @_n_ctx.setter
    def _n_ctx(self, value: int) -> None:
        self.__dict__["_kv_n_ctx_cells"] = value

    # --- statistics ----------------------------------------------------------------------------------------------

    def kv_stats(self) -> dict[str, Any]:
        """Cells before/after the last eviction, attention window, bytes freed, time scoring/evicting/compacting,
        KV bytes held now and allocated."""
        stats = self._kv_engine.stats.as_dict()
        stats["cells_now"] = self._kv_engine.cache.n_cells()
        stats["attended_now"] = self._kv_engine.cache.n_attended()
        # what the cache's cells hold now, and what llama.cpp allocated for n_ctx cells
        stats["kv_bytes_now"] = stats["cells_now"] * stats["bytes_per_cell"]
        stats["kv_bytes_allocated"] = self.n_ctx() * stats["bytes_per_cell"]
        stats["policy"] = self._kv_settings.policy_name if self._kv_settings else None
        return stats

    def kv_positions(self) -> np.ndarray:
        """Positions the cache holds for the model's sequence, ascending."""
        return self._kv_engine.cache.positions()

    def kv_scores(self) -> dict[str, np.ndarray] | None:
        """The scores of the last eviction, as the policy produced them (before any token-level reduction):
        ``{"positions": [n_cells], "scores": [n_layer, n_head_kv, n_cells] or [n_cells]}``, and after an earlier
        per-head eviction ``"head_positions": [n_layer, n_head_kv, n_cells]`` (the token each head's cell held);
        None before the first eviction. Higher means more worth keeping."""
        return self._kv_last_scores

    def reset(self) -> None:
        super().reset()
        self._stop_tap()
        self._kv_lossy = False
        self._kv_cell_scores = None
        self._kv_head = 0
        if "_kv_engine" in self.__dict__:
            self._kv_engine.forget_layout()

    # --- attention tap ---

    def _observation_window(self) -> int:
        settings = self._kv_settings
        assert settings is not None
        return max(1, settings.window)

    def _start_tap(self, p0: int, p1: int) -> None:
        policy = self._kv_policy
        assert policy is not None
        self._kv_tap.start(SEQ_ID, p0, p1, policy.tap_reduce_rows, policy.tap_reduce_heads)
        self._kv_tap_running = True

    def _stop_tap(self) -> None:
        if self.__dict__.get("_kv_tap_running"):
            self._kv_tap.stop()
            self._kv_tap_running = False

    # --- generation hooks ----------------------------------------------------------------------------------------

    def generate(self, tokens: Sequence[int], *args: Any, reset: bool = True,
                 **kwargs: Any) -> Generator[int, Sequence[int] | None, None]:
        context, self._kv_pending_context = self._kv_pending_context, None
        if context is not None and reset and _starts_with(tokens, context.tokens):
            # answering from a compressed context: its cache, then only the tokens after it
            self._restore_context(context)
            return (yield from super().generate(list(tokens)[context.n_tokens:], *args, reset=False, **kwargs))
        if reset and (self._kv_policy is not None or self._kv_lossy):
            # a lossy cache is not a prefix of anything: start over instead of the parent's prefix matching
            self.reset()
        if reset and self._kv_policy is not None:
            self._kv_prompt_pending = True
        return (yield from super().generate(tokens, *args, reset=reset, **kwargs))

    def prefill(self, tokens: Sequence[int], reset: bool = True) -> None:
        """Decode ``tokens`` as a prompt: the cache is filled in chunks and, with a policy, evicted to the
        budget. With ``reset=False`` the tokens continue what the cache holds (e.g. after ``kv_restore``) and the
        budget applies to all of it. Continue with ``generate(more_tokens, reset=False)``: when the question comes
        in ``more_tokens``, this is query-agnostic compression (the policy never saw the question)."""
        if reset:
            self.reset()
        self._kv_prompt_pending = self._kv_policy is not None
        self.eval(tokens)

    def kv_snapshot(self) -> KVSnapshot:
        """A copy of what the model's sequence holds: llama.cpp's sequence state, the tokens decoded so far, and
        after a per-head eviction which token each (layer, KV head, cell) holds (llama.cpp's state format keeps
        one position per cell: the largest of its tokens')."""
        ctx = self._ctx.ctx
        self._ctx.kv_cache_seq_rm(SEQ_ID, self.n_tokens, -1)  # cells past n_tokens are stale (after reset())
        size = llama_cpp_api.llama_state_seq_get_size(ctx, SEQ_ID)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp_api.llama_state_seq_get_data(ctx, buffer, size, SEQ_ID)
        if written == 0 and size > 0:
            raise RuntimeError("llama_state_seq_get_data copied nothing")
        layout = self._kv_engine.head_positions(self._kv_engine.cache.positions())
        return KVSnapshot(data=bytes(buffer[:written]), tokens=self.input_ids[:self.n_tokens].copy(),
                          head_positions=layout)

    def kv_restore(self, snapshot: KVSnapshot | CompressedContext) -> None:
        """Replace what the model's sequence holds by ``snapshot`` (taken from this model with the same context
        parameters) or by a compressed context; the next ``prefill(..., reset=False)`` or
        ``generate(..., reset=False)`` continues it."""
        if isinstance(snapshot, CompressedContext):
            self._check_context(snapshot)
            return self._restore_context(snapshot)
        if not isinstance(snapshot, KVSnapshot):
            raise ValueError(f"kv_restore() takes a KVSnapshot or a CompressedContext, got {type(snapshot).__name__}")
        self.reset()
        self._ctx.kv_cache_seq_rm(SEQ_ID, -1, -1)
        if snapshot.data:
            buffer = (ctypes.c_uint8 * len(snapshot.data)).from_buffer_copy(snapshot.data)
            if llama_cpp_api.llama_state_seq_set_data(self._ctx.ctx, buffer, len(snapshot.data), SEQ_ID) == 0:
                raise ValueError("the snapshot does not fit this model's cache (another model, or fewer cells)")
        n_tokens = int(snapshot.tokens.size)
        if n_tokens > self.input_ids.shape[0]:
            self.input_ids = np.zeros(n_tokens, dtype=self.input_ids.dtype)
        self.input_ids[:n_tokens] = snapshot.tokens
        self.n_tokens = n_tokens
        self._kv_engine.set_head_layout(snapshot.head_positions)
        self._kv_lossy = self._kv_engine.cache.n_cells() < n_tokens or snapshot.head_positions is not None
        return None

    # --- compressed contexts -----------------------------------------------------------------------------------

    def compress(self, context: str | Sequence[int], keep: float | None = None, budget: int | None = None,
                 system: str | None = None, policy: str | None = None,
                 granularity: str | None = None) -> CompressedContext:
        """Prefill ``context`` and compress its cache before any question is known; returns a
        ``CompressedContext`` that ``ask`` and ``create_chat_completion(..., context=...)`` answer from.

        ``context`` as text becomes the start of a user turn of the model's chat template (after a system turn
        with ``system``, if given); questions continue that turn. As token ids it is used as given, and questions
        are appended as raw tokens. The policy, keep/budget and granularity default to this ``Llama``'s settings
        (kvzip, keep 0.5 when it has none); the template's tokens before the context are never evicted. The cache
        holds the compressed context afterwards, but the next call without ``context=`` starts over."""
        tokens, chat, n_protected = self._context_tokens(context, system)
        base = self._kv_settings
        name = policy if policy is not None else (base.policy_name if base is not None else "kvzip")
        same_policy = base is not None and base.policy_name == name
        if keep is None and budget is None and same_policy:
            keep, budget = base.keep, base.budget
        if granularity is None and same_policy:
            granularity = base.granularity
        window = base.window if base is not None else DEFAULT_WINDOW
        sink = max(base.sink if base is not None else DEFAULT_SINK, n_protected)
        settings = validate_settings(name, keep, budget, window, sink, granularity)
        self._check_supported(settings)
        self._stop_tap()
        previous = self._kv_settings, self._kv_policy, self._kv_last_scores
        self._kv_settings, self._kv_policy, self._kv_last_scores = settings, settings.policy(), None
        self._kv_head_hint = n_protected
        try:
            self.prefill(tokens)
            snapshot = self.kv_snapshot()
            positions = self.kv_positions().copy()
            scores = self._kv_cell_scores
            if scores is not None and scores.shape[2] != positions.size:
                scores = None  # nothing was evicted (the context fits the budget)
        finally:
            self._stop_tap()
            self._kv_settings, self._kv_policy, self._kv_last_scores = previous
            self._kv_prompt_pending = False
            self._kv_head_hint = None
            self.reset()
        return CompressedContext(
            state=snapshot.data, tokens=snapshot.tokens.astype(np.int32), positions=positions,
            head_positions=snapshot.head_positions, scores=scores, model=self.model_identity(), policy=name,
            granularity=settings.granularity, keep=settings.keep, budget=settings.budget, n_protected=n_protected,
            chat=chat)

    def ask(self, context: CompressedContext, question: str | Sequence[int], **kwargs: Any) -> str:
        """Answer ``question`` from a compressed context and return the answer's text. ``kwargs`` are
        ``create_chat_completion``'s (``create_completion``'s for a context given as tokens), e.g. max_tokens,
        temperature. Every call starts from the context's cache: nothing of an earlier question remains."""
        self._check_context(context)
        if kwargs.get("stream"):
            raise ValueError("ask() returns the whole answer; for stream=True use "
                             "create_chat_completion(messages, context=..., stream=True)")
        if context.chat is not None:
            if not isinstance(question, str):
                raise ValueError("this context continues a chat turn: ask() takes the question as text")
            response = self.create_chat_completion([{"role": "user", "content": question}], context=context,
                                                   **kwargs)
            return response["choices"][0]["message"]["content"] or ""
        if isinstance(question, str):
            question_tokens = self.tokenize(question.encode(), add_bos=False, special=True)
        else:
            question_tokens = self._checked_tokens(question, "question")
        if not question_tokens:
            raise ValueError("the question is empty")
        self._kv_pending_context = context
        completion = self.create_completion(context.tokens.tolist() + question_tokens, **kwargs)
        return completion["choices"][0]["text"]

    def create_chat_completion(self, messages: list[dict[str, Any]], *args: Any,
                               context: CompressedContext | None = None, **kwargs: Any) -> Any:
        """llama_cpp.Llama.create_chat_completion; with ``context=`` (from ``compress`` or ``load_context``) the
        first user message is asked about the compressed context (it continues the context's user turn) and
        the answer starts from the context's cache, formatted with the model's own chat template."""
        if context is None:
            return super().create_chat_completion(messages, *args, **kwargs)
        self._check_context(context)
        if args:
            raise ValueError("with context=, pass create_chat_completion's options by name")
        if context.chat is None:
            raise ValueError("this context was compressed from token ids; use ask(), or compress the text")
        for option in ("functions", "function_call", "tools", "tool_choice"):
            if kwargs.get(option) is not None:
                raise ValueError(f"{option}= is not supported with context=")
        if not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
            raise ValueError("with context=, the first message must be the user's question (the system prompt "
                             "is part of the compressed context: compress(..., system=...))")
        question = messages[0].get("content")
        if not isinstance(question, str) or not question:
            raise ValueError(f"the first message's content must be a non-empty string, got {question!r}")
        system = [] if context.chat.system is None else [{"role": "system", "content": context.chat.system}]
        joined = system + [{**messages[0], "content": CONTEXT_MARK + context.chat.separator + question}]
        joined += list(messages[1:])
        prompt = self.chat_formatter()(messages=joined).prompt
        if not prompt.startswith(context.chat.template_head + CONTEXT_MARK):
            raise ValueError("the chat template puts these messages somewhere else than the compressed context "
                             "(a system message? give it to compress(system=...))")
        if self._kv_context_chat_handler is None:
            self._kv_context_chat_handler = self.chat_formatter().to_chat_handler()
        # the handler tokenizes the formatted prompt; tokenize() hands back the context's own tokens for it
        self._kv_pending_context = context
        return self._kv_context_chat_handler(llama=self, messages=joined, **kwargs)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        context = self.__dict__.get("_kv_pending_context")
        if context is not None and context.chat is not None:
            head = (context.chat.template_head + CONTEXT_MARK).encode()
            if text.startswith(head):
                rest = super().tokenize(text[len(head):], add_bos=False, special=special)
                return context.tokens.tolist() + rest
        return super().tokenize(text, add_bos=add_bos, special=special)

    def load_context(self, path: str | os.PathLike[str]) -> CompressedContext:
        """Read a context written by ``CompressedContext.save``. ContextFileError (a ValueError) for a file that
        is not one, is truncated or corrupted, or was made with another model or KV cache type."""
        context = read_context_file(path)
        self._check_context(context)
        return context

    def model_identity(self) -> ModelIdentity:
        """What a compressed context made with this model depends on (see ``kvgguf.context.ModelIdentity``)."""
        if self._kv_identity is None:
            self._kv_identity = ModelIdentity(
                fingerprint=file_fingerprint(self.model_path), name=str(self.metadata.get("general.name", "")),
                architecture=str(self.metadata.get("general.architecture", "")), n_layer=self._kv_engine.n_layer,
                n_head_kv=self._kv_engine.n_head_kv, n_embd=self.n_embd(), n_vocab=self.n_vocab(),
                type_k=int(self.context_params.type_k), type_v=int(self.context_params.type_v))
        return self._kv_identity

    def _check_context(self, context: CompressedContext) -> None:
        if not isinstance(context, CompressedContext):
            raise ValueError(f"expected a CompressedContext (from compress() or load_context()), got "
                             f"{type(context).__name__}")
        mismatch = self.model_identity().mismatch(context.model)
        if mismatch is not None:
            raise ContextFileError(f"the compressed context does not fit this model: {mismatch}")
        if context.n_cells + 1 > self.n_ctx():
            raise ValueError(f"the compressed context holds {context.n_cells} cells; this Llama's n_ctx="
                             f"{self.n_ctx()} leaves no room to answer: use n_ctx > {context.n_cells}")

    def _restore_context(self, context: CompressedContext) -> None:
        self.kv_restore(KVSnapshot(data=context.state, tokens=context.tokens, head_positions=context.head_positions))
        if not np.array_equal(self.kv_positions(), context.positions):
            raise ContextFileError("the restored cache does not hold the positions the context file lists")
        self._kv_lossy = True
        self._kv_head = context.n_protected
        if context.scores is not None and self._kv_policy is not None and self._kv_policy.name == context.policy:
            # the context's cells keep their scores; a decode-time eviction scores only what was decoded since
            self._kv_cell_scores = context.scores.copy()

    def _template_head(self, system: str | None) -> tuple[ChatLayout, list[int]]:
        """The chat template's text and tokens before a user turn's content (after a system turn with
        ``system``; with None, the template's default)."""
        messages = [] if system is None else [{"role": "system", "content": system}]
        prompt = self.chat_formatter()(messages=messages + [{"role": "user", "content": CONTEXT_MARK}]).prompt
        chat = ChatLayout(template_head=prompt[:prompt.index(CONTEXT_MARK)], separator="\n\n", system=system)
        return chat, self.tokenize(chat.template_head.encode(), add_bos=False, special=True)

    def _template_head_len(self, tokens: Sequence[int]) -> int:
        """How many of a prompt's first tokens are the chat template's head of a user turn with the template's
        default system prompt (kvpress's KVzip tells the context from the template the same way); compress()
        gives the head of its own layout."""
        if self._kv_head_hint is not None:
            return self._kv_head_hint
        if self._kv_default_head is None:
            has_template = "tokenizer.chat_template" in self.metadata
            self._kv_default_head = self._template_head(None)[1] if has_template else []
        head = self._kv_default_head
        return len(head) if head and list(tokens[:len(head)]) == head else 0

    def _protected_head(self) -> int:
        """The first cells never evicted: the sinks, or for KVzip the chat template's head if longer."""
        settings = self._kv_settings
        assert settings is not None
        return max(settings.sink, self._kv_head)

    def _context_tokens(self, context: str | Sequence[int],
                        system: str | None) -> tuple[list[int], ChatLayout | None, int]:
        """The tokens to compress, how questions join them, and how many template tokens lead them."""
        if isinstance(context, str):
            if not context:
                raise ValueError("the context is empty")
            if system is not None and not isinstance(system, str):
                raise ValueError(f"system must be a string, got {type(system).__name__}")
            if "tokenizer.chat_template" not in self.metadata:
                if system is not None:
                    raise ValueError("system= needs a chat template; this GGUF file has none")
                return self.tokenize(context.encode(), add_bos=True, special=False), None, 0
            chat, head = self._template_head(system)
            body = self.tokenize(context.encode(), add_bos=False, special=False)
            return head + body, chat, len(head)
        if system is not None:
            raise ValueError("system= needs the context as text (token ids are used as given)")
        tokens = self._checked_tokens(context, "context")
        if not tokens:
            raise ValueError("the context is empty")
        return tokens, None, 0

    def _checked_tokens(self, tokens: Sequence[int], what: str) -> list[int]:
        try:
            ids = [int(t) for t in tokens]
        except (TypeError, ValueError) as err:
            raise ValueError(f"the {what} must be text or a sequence of token ids: {err}") from err
        bad = [t for t in ids if not 0 <= t < self.n_vocab()]
        if bad:
            raise ValueError(f"the {what} has token ids outside [0, {self.n_vocab()}): {bad[:5]}")
        return ids

    def eval(self, tokens: Sequence[int]) -> None:
        tokens = list(tokens)
        if self._kv_policy is None:
            n_cells = self._kv_engine.cache.n_cells() if self._kv_lossy else self.n_tokens
            if n_cells + len(tokens) > self.n_ctx():
                raise ValueError(f"the cache is full: {n_cells} cells + {len(tokens)} new tokens exceed "
                                 f"n_ctx={self.n_ctx()}; use a larger n_ctx, or kv_eviction= to evict while decoding")
            return self._eval_growing(tokens)
        if self._kv_prompt_pending:
            self._kv_prompt_pending = False
            self._prefill_with_eviction(tokens)
        else:
            # cells past n_tokens (left by a reset(), say) are what the parent's eval drops anyway: drop them before
            # counting the room, or they would be evicted for, and reconstructed, as if they were context
            self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
            if (self._observes_window() and not self._kv_tap_running and
                    self._kv_engine.cache.n_cells() + len(tokens) > self.n_ctx() - self._observation_window() - 1):
                # the cache is about to fill: the next tokens observe, as the prompt's last tokens did at prefill
                self._start_tap(self.n_tokens, POS_END)
            self._make_room(len(tokens))
            self._eval_growing(tokens)
        return None

    def _prefill_with_eviction(self, tokens: list[int]) -> None:
        """Prefill in chunks that fit the cache, evicting between chunks, then evict to the budget."""
        settings = self._kv_settings
        assert settings is not None
        if self._kv_policy is not None and self._kv_policy.observes_reconstruction and not self._kv_lossy:
            # the cache holds every token so far as decoded: the head is read off the whole prompt, however it
            # arrives (one prefill, or continuing a restored snapshot or an earlier prefill without eviction)
            self._kv_head = self._template_head_len(self.input_ids[:self.n_tokens].tolist() + tokens)
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)  # what the parent's eval would drop anyway
        n_prompt_cells = self._kv_engine.cache.n_cells() + len(tokens)
        n_ctx = self.n_ctx() - self._reconstruction_reserve()
        fits = n_prompt_cells <= n_ctx
        chunk = self.n_batch if fits else self._chunk_size()  # pieces matter only when evictions come between
        starts = list(range(0, len(tokens), chunk))
        for i, start in enumerate(starts):
            piece = tokens[start:start + chunk]
            # evictions before the whole prompt is in decide per cell; the last one at the set granularity.
            # (Measured with KVzip, a 3K context in 1K cells at keep 0.2: per-head evictions at every piece lost
            # all three facts, per-cell ones kept them.)
            self._make_room(len(piece), slack=False, granularity="token")
            is_last = i == len(starts) - 1
            next_len = 0 if is_last else min(chunk, len(tokens) - starts[i + 1])
            evicts_next = is_last or self._kv_engine.cache.n_cells() + len(piece) + next_len > n_ctx
            if self._observes_window() and evicts_next:
                # the last tokens of a chunk that an eviction follows are the observers for that eviction
                end = self.n_tokens + len(piece)
                self._start_tap(max(0, end - self._observation_window()), end)
            self._eval_growing(piece)
        # leave room for the observation window (or reconstruction) of a later, decode-time eviction
        room_cap = self.n_ctx() - self._observation_window() - 2 - self._reconstruction_reserve()
        target = dataclasses.replace(settings, sink=self._protected_head()).target_cells(n_prompt_cells)
        self._evict_to(min(target, room_cap))
        self._stop_tap()

    def _chunk_size(self) -> int:
        settings = self._kv_settings
        assert settings is not None
        reserve = self._reconstruction_reserve()
        room = self.n_ctx() - self._protected_head() - settings.window - 1 - reserve
        piece = self._reconstruction_piece() if reserve else self.n_batch
        return max(1, min(piece, room // 2))

    def _make_room(self, n_new: int, slack: bool = True, granularity: str | None = None) -> None:
        """Evict before decoding ``n_new`` tokens if they would not fit in the n_ctx cells (less KVzip's
        reconstruction reserve)."""
        n_ctx = self.n_ctx() - self._reconstruction_reserve()
        n_cells = self._kv_engine.cache.n_cells()
        if n_cells + n_new <= n_ctx:
            return
        settings = self._kv_settings
        assert settings is not None
        # only make room: the budget is applied once the whole prompt is known (a query-aware policy sees the
        # question last). While decoding, a little slack keeps it from evicting at every step.
        n_slack = min(n_ctx // 8, 256) if slack else 0
        n_protected = self._protected_head() + settings.window
        self._evict_to(max(n_ctx - n_new - n_slack, n_protected + 1), granularity)
        if self._kv_engine.cache.n_cells() + n_new > n_ctx:
            raise ValueError(f"cannot fit {n_new} new tokens into {n_ctx} cells with kv_sink + kv_window = "
                             f"{n_protected} protected; use a larger n_ctx")

    def _evict_to(self, n_keep: int, granularity: str | None = None) -> None:
        positions = self._kv_engine.cache.positions()
        if positions.size <= n_keep:
            return
        settings = self._kv_settings
        policy = self._kv_policy
        assert settings is not None and policy is not None
        t0 = time.perf_counter()
        attention = None
        if policy.observes_reconstruction:
            attention = self._reconstruction_attention(positions)
        elif policy.needs_attention:
            if self._kv_tap_running and self._kv_tap.n_rows() > 0:
                attention = self._kv_tap.scores(SEQ_ID)
            else:
                # cannot happen in the prefill/decode flow above (the tap always runs before an eviction);
                # refuse rather than evict blindly
                raise RuntimeError(f"{policy.name} needs attention scores, but the tap observed no query")
        scores = policy.score(ScoreInput(positions=positions, n_layer=self._kv_engine.n_layer,
                                         n_head_kv=self._kv_engine.n_head_kv, attention=attention))
        self._kv_last_scores = {"positions": positions, "scores": scores}
        layout = self._kv_engine.head_positions(positions)
        if layout is not None:
            self._kv_last_scores["head_positions"] = layout
        if scores.ndim == 3 and (granularity or settings.granularity) == "token":
            # one decision per cell: the max over layers and heads
            scores = reduce_groups(scores.reshape(-1, positions.size), scores.shape[0] * scores.shape[1], "max")[0]
        score_s = time.perf_counter() - t0
        protect = np.zeros(positions.size, dtype=bool)
        protect[:self._protected_head()] = True
        protect[max(0, positions.size - settings.window):] = True
        protect[-1] = True
        self._stop_tap()  # the scores follow cell indices, which the eviction changes
        self._kv_engine.evict(positions, scores, n_keep, protect, score_s=score_s)
        self._kv_lossy = True
        if policy.observes_reconstruction:
            self._kv_cell_scores = self._kept_scores(self._kv_last_scores["scores"])

    def _kept_scores(self, scores: np.ndarray) -> np.ndarray:
        """Per-(layer, head) ``scores`` of the cells before the last eviction, for the cells it kept."""
        kept = self._kv_engine.last_kept
        assert kept is not None
        if kept.ndim == 1:
            return np.ascontiguousarray(scores[:, :, kept])
        return np.take_along_axis(scores, kept.astype(np.intp), axis=2)

    def _observes_window(self) -> bool:
        """The policy scores with the tap over the prompt's last window (SnapKV), not a reconstruction."""
        policy = self._kv_policy
        return policy is not None and policy.needs_attention and not policy.observes_reconstruction

    def chat_formatter(self) -> Jinja2ChatFormatter:
        """The model's own chat template (from the GGUF metadata); ValueError if the file has none."""
        if self._kv_chat_formatter is None:
            template = self.metadata.get("tokenizer.chat_template")
            if template is None:
                raise ValueError("this GGUF file has no tokenizer.chat_template")
            self._kv_chat_formatter = Jinja2ChatFormatter(
                template=template, eos_token=self._token_text(self.token_eos()),
                bos_token=self._token_text(self.token_bos()))
        return self._kv_chat_formatter

    def _token_text(self, token: int) -> str:
        return self._model.token_get_text(token) if token != -1 else ""

    def _turn_end(self) -> list[int]:
        """The chat template's tokens after a user message up to the assistant's answer (end of the user turn,
        assistant header); a blank line without a template."""
        if self._kv_turn_end is None:
            if "tokenizer.chat_template" in self.metadata:
                prompt = self.chat_formatter()(messages=[{"role": "user", "content": CONTEXT_MARK}]).prompt
                text = prompt[prompt.index(CONTEXT_MARK) + len(CONTEXT_MARK):]
            else:
                text = "\n\n"
            self._kv_turn_end = self.tokenize(text.encode(), add_bos=False, special=True)
        return self._kv_turn_end

    def _reconstruction_request(self, text: str, quoted: list[int]) -> list[int]:
        """KVzip's request, as the context's user turn would go on: a blank line, ``text``, the ``quoted`` token
        ids, then the end of the turn and the assistant header (the teacher-forced context follows)."""
        return self.tokenize(f"\n\n{text}".encode(), add_bos=False, special=False) + quoted + self._turn_end()

    def _reconstruction_request_len(self) -> int:
        """Upper bound of a reconstruction request's tokens (the chat template, the request, the quote)."""
        if self._kv_request_len is None:
            self._kv_request_len = len(self._reconstruction_request(NEXT_REQUEST, [0] * QUOTED_TOKENS)) + 8
        return self._kv_request_len

    def _reconstruction_reserve(self, policy: Policy | None = None) -> int:
        """Cells kept free for a KVzip reconstruction (a request and a chunk of forced tokens); 0 for others."""
        policy = policy if policy is not None else self._kv_policy
        if policy is None or not policy.observes_reconstruction:
            return 0
        return self._reconstruction_request_len() + self._reconstruction_piece()

    def _reconstruction_room(self, n_cells: int) -> int:
        """Forced tokens a reconstruction chunk can take after ``n_cells`` cells and the request."""
        return self.n_ctx() - n_cells - self._reconstruction_request_len()

    def _reconstruction_piece(self) -> int:
        """Prompt tokens a KVzip prefill decodes between evictions (each is reconstructed at the next one):
        small, so that a context longer than n_ctx leaves most cells to the compressed part before it."""
        return min(self.n_batch, max(MIN_RECONSTRUCTION_CHUNK, self.n_ctx() // 8))

    def _reconstruction_batch(self) -> int:
        """Tokens per decode call of a KVzip reconstruction. Every reconstruction query attends to the whole
        context, so a ubatch's attention probabilities ([cells, tokens, heads], written by the softmax, read by
        the tap's max and by the product with V) are large: on the CPU, 128 rows of them stay in the last-level
        cache where n_batch = 512 rows do not (measured on the default model: the reconstruction ~5% faster at
        2K-8K cells, 64 rows slower again). A GPU takes the context's n_batch."""
        offloaded = bool(llama_cpp.llama_supports_gpu_offload()) and self.model_params.n_gpu_layers != 0
        return self.n_batch if offloaded else min(self.n_batch, RECONSTRUCTION_BATCH_CPU)

    def _reconstruction_attention(self, positions: np.ndarray) -> np.ndarray:
        """KVzip's scores of the cells at ``positions``: the max attention of the queries that reconstruct the
        context. The cells decoded since the last eviction are teacher-forced after a "repeat the context"
        request, chunk by chunk, after the cache's cells, with the tap on (``_reconstruct``); then those cells are
        removed again. The cells scored at earlier evictions keep their scores: maxing them with every later
        reconstruction too would favour the start of a context prefilled piece by piece (its cells would see
        more queries than the later ones). Where the cache has no room for a reconstruction (a decode-time
        eviction with no reserve left), the unscored cells rank above all others."""
        n_layer, n_head_kv = self._kv_engine.n_layer, self._kv_engine.n_head_kv
        n_cells = positions.size
        known = self._kv_cell_scores
        n_known = 0 if known is None else min(known.shape[2], n_cells)
        scores = np.zeros((n_layer, n_head_kv, n_cells), dtype=np.float32)
        if n_known:
            scores[:, :, :n_known] = known[:, :, :n_known]
        if n_known == n_cells:
            return scores
        room = self._reconstruction_room(n_cells)
        if room < MIN_RECONSTRUCTION_CHUNK:
            if n_known == 0:
                raise ValueError(f"kvzip has no scores for the {n_cells} cells of this cache and no room to "
                                 f"reconstruct them in n_ctx={self.n_ctx()}; use a larger n_ctx")
            scores[:, :, n_known:] = np.finfo(np.float32).max
            return scores
        n_done = self.n_tokens
        chunks = self._reconstruction_chunks(positions[n_known:], room)
        if not chunks:
            return scores
        new = scores[:, :, n_known:]
        self._reconstruct(chunks, lambda observed: np.maximum(new, observed[:, :, n_known:n_cells], out=new))
        # the logits of the context's last token again (the reconstruction overwrote them)
        last = int(self.input_ids[n_done - 1])
        self._ctx.kv_cache_seq_rm(SEQ_ID, n_done - 1, -1)
        self.n_tokens = n_done - 1
        self._eval_growing([last])
        return scores

    def _reconstruction_chunks(self, positions: np.ndarray, room: int) -> list[ReconstructionChunk]:
        """KVzip's reconstruction of the cells at ``positions`` (ascending, not scored yet) in ``room`` cells: its
        chunks of request and teacher-forced tokens. The context to reconstruct starts after the chat template's
        head (or a BOS token); those cells are protected and are not reconstructed."""
        policy = self._kv_policy
        assert isinstance(policy, KVzipPolicy)
        start = max(self._kv_head, 1 if self.input_ids[0] == self.token_bos() else 0)
        forced = positions[positions >= start]
        if forced.size == 0:
            return []
        new_tokens = self.input_ids[forced].tolist()
        preceding = self.input_ids[max(start, int(forced[0]) - QUOTED_TOKENS):int(forced[0])].tolist()
        return policy.reconstruction(new_tokens, min(CHUNK_TOKENS, room), self._reconstruction_request,
                                     preceding=preceding)

    def _reconstruct(self, chunks: list[ReconstructionChunk],
                     observe: Callable[[np.ndarray], Any] | None) -> None:
        """Decode each chunk (its request, then its forced tokens) after the cache's cells, in decodes of
        ``_reconstruction_batch()`` tokens, and remove its cells again. With ``observe``, the tap runs on all of
        the chunk's queries (the request's as the forced tokens', as in the reference) and ``observe`` gets its
        scores, [n_layer, n_head_kv, cells]; without, this is the reconstruction forward alone, which `kvgguf
        bench speed` times beside the tapped one. The logits afterwards are the last reconstruction token's."""
        n_done = self.n_tokens
        batch = self._reconstruction_batch()
        for chunk in chunks:
            queries = chunk.request + chunk.forced
            if observe is not None:
                self._start_tap(n_done, n_done + len(queries))
            for start in range(0, len(queries), batch):
                self._eval_growing(queries[start:start + batch])
            if observe is not None:
                observe(self._kv_tap.scores(SEQ_ID))
                self._stop_tap()
            self._ctx.kv_cache_seq_rm(SEQ_ID, n_done, -1)
            self.n_tokens = n_done

    def _eval_growing(self, tokens: list[int]) -> None:
        """The parent's eval, with input_ids (and scores when logits_all) grown past n_ctx positions."""
        needed = self.n_tokens + len(tokens)
        if needed > self.input_ids.shape[0]:
            grown = np.zeros(max(needed, 2 * self.input_ids.shape[0]), dtype=self.input_ids.dtype)
            grown[:self.n_tokens] = self.input_ids[:self.n_tokens]
            self.input_ids = grown
        if self._logits_all and needed > self.scores.shape[0]:
            grown_scores = np.zeros((max(needed, 2 * self.scores.shape[0]), self.scores.shape[1]),
                                    dtype=self.scores.dtype)
            grown_scores[:self.n_tokens] = self.scores[:self.n_tokens]
            self.scores = grown_scores
        super().eval(tokens)

