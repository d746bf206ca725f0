"""``kvgguf.Llama``: llama_cpp.Llama with KV-cache eviction, the drop-in adapter.

Settings are checked here, at the edge; llama-cpp-python's entry points (``eval``, ``generate``, ``reset``,
``tokenize``) are routed to the sequence's ``EvictionController``, which decides when to evict; policies score
through the ``ScoringContext``; the ``EvictionEngine`` evicts. Compressed contexts live in ``contexts``, the
chat template in ``chat``.

Eviction changes what the cache holds, so the cache stops being a faithful copy of ``input_ids``. Two rules
follow: positions are never renumbered (the next token goes to ``n_tokens``, which may exceed ``n_ctx``), and
the parent's automatic prefix reuse is switched off whenever eviction is on, so a lossy cache is never silently
reused as a token prefix by a later call.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np

from . import rpc
from ._native import llama_cpp, llama_cpp_api
from .chat import ChatTemplate
from .contexts import CompressedContext, ContextSession, KVSnapshot, ModelIdentity, read_context_file
from .controller import EvictionController
from .engine import EvictionEngine, KVCacheView, kv_bytes_per_cell
from .head_profile import AUTO, resolve_profile
from .calibrate_lazy import lazy_defaults
from .lookahead import LookaheadRuntime, resolve_lookahead
from .models import check_gguf_file
from .policies import policy_class
from .scoring import ProgressCallback, ScoringContext
from .settings import DEFAULT_SINK, EvictionSettings, validate_settings

logger = logging.getLogger(__name__)

GPU_LAYERS_ENV = "LLAMA_ARG_N_GPU_LAYERS"   # llama.cpp's tools read -ngl from it too


def gpu_layers_from_env() -> int:
    """``LLAMA_ARG_N_GPU_LAYERS`` as an int (0 when unset); ValueError naming it when it is not one."""
    value = os.environ.get(GPU_LAYERS_ENV, "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{GPU_LAYERS_ENV}={value!r} is not a number of layers") from None

SEQ_ID = 0  # llama_cpp.Llama decodes everything into sequence 0


class _Sequence:
    """Sequence 0 of a Llama, as the controller and the scoring context see it (``scoring.ScoringHost``)."""

    seq_id = SEQ_ID

    def __init__(self, llm: Llama) -> None:
        self._llm = llm
        self.ctx = llm._ctx.ctx
        self.model = llm._model.model
        self.offloaded = bool(llama_cpp.llama_supports_gpu_offload()) and llm.model_params.n_gpu_layers != 0

    @property
    def n_tokens(self) -> int:
        return self._llm.n_tokens

    @n_tokens.setter
    def n_tokens(self, value: int) -> None:
        self._llm.n_tokens = value

    def token_ids(self) -> np.ndarray:
        return self._llm.input_ids

    def decode_tokens(self, tokens: list[int]) -> None:
        self._llm._eval_growing(tokens)

    def grow(self, n_positions: int) -> None:
        self._llm._grow(n_positions)

    def memory_replaced(self) -> None:  # a tiered cache, or the plain one again: llama-cpp-python keeps a handle
        self._llm._ctx.memory = llama_cpp_api.llama_get_memory(self.ctx)

    def lora_adapters(self) -> list[tuple[Any, float]]:
        adapter = getattr(self._llm, "_lora_adapter", None)
        return [(adapter, self._llm.lora_scale)] if adapter else []


class Llama(llama_cpp.Llama):
    """Drop-in ``llama_cpp.Llama`` with KV-cache eviction.

    Args (in addition to llama_cpp.Llama's):
        kv_eviction: policy name (see ``kvgguf.policies.POLICIES``) or None for no eviction.
        kv_keep: fraction of the evictable prompt cells kept, 0 < r <= 1 (default 0.5 when no budget is given).
        kv_budget: absolute number of cells kept instead of a fraction.
        kv_window: most recent cells that are never evicted (and SnapKV's observation window); default 32
            (LazyEviction: its kv_lazy_window).
        kv_sink: first cells that are never evicted (attention sinks).
        kv_granularity: "head" (each KV head keeps its own tokens; needs a policy that scores per head) or
            "token" (one decision per token); default: the policy's (snapkv head, kvzip token).
        kv_evict_every: (policies that observe decoding) bring the cache back to the budget every this many
            decoded tokens.
        kv_head_profile: "auto" (the profile shipped for this model file, if any), a path, or None (off); with
            one, kvzip gives each KV head its profiled budget in a tiered cache ("kvzip-head" needs one).
        kv_tiers: (kvzip with a head profile) how many tiers the per-head budgets are grouped into, 1-8 (default
            3): each layer whose heads fall in more than one tier attends once per tier, so fewer tiers decode
            faster and follow the profile less closely.
        kv_lookahead: (kv_eviction="lookahead") the path of a LookaheadKV module converted for this model
            (`kvgguf train-lookahead`, `kvgguf convert lookahead`); None: the one shipped for this model file.
        kv_lazy_window: (kv_eviction="lazy") LazyEviction's observation window W: every W decoded tokens the
            cache goes back to the budget, keeping the W most recent cells; the cache holds at most budget + W
            cells. Default: the model's shipped calibration (`kvgguf calibrate-lazy`, kvgguf/lazy_windows/), else
            128.
        kv_lazy_alpha: (kv_eviction="lazy") the attention probability that counts as attending a cell, in
            (0, 1). Default: the model's shipped calibration's, else 1e-4.
        rpc_servers: llama.cpp RPC servers (``kvgguf rpc-server`` on other hosts), ``"host:port,host:port"`` or a
            list: registered as devices before the model loads (``kvgguf.rpc``); ``n_gpu_layers`` layers then go
            to them. Eviction works the same on layers held there.

    ``n_gpu_layers``, when not given, comes from the environment variable ``LLAMA_ARG_N_GPU_LAYERS`` as in
    llama.cpp's tools (else llama-cpp-python's default, 0): a whole program, or test suite, offloads with it.

    With a policy, prompts longer than ``n_ctx`` are prefilled in chunks with eviction between chunks, and
    generation that fills the cache evicts again instead of failing; positions may run up to
    ``max(n_ctx, n_ctx_train)``.
    """

    def __init__(self, model_path: str, *args: Any, kv_eviction: str | None = None, kv_keep: float | None = None,
                 kv_budget: int | None = None, kv_window: int | None = None, kv_sink: int = DEFAULT_SINK,
                 kv_granularity: str | None = None, kv_evict_every: int | None = None,
                 kv_head_profile: str | os.PathLike[str] | None = AUTO, kv_tiers: int | None = None,
                 kv_lookahead: str | os.PathLike[str] | None = None, kv_lazy_window: int | None = None,
                 kv_lazy_alpha: float | None = None, rpc_servers: str | Sequence[str] | None = None,
                 **kwargs: Any) -> None:
        # the settings are checked with the model's shipped LazyEviction calibration (its window bounds the budget)
        # where the file can be read, and before the file itself, so that a bad setting is named first
        try:
            check_gguf_file(model_path)
            calibrated = lazy_defaults(kv_eviction, model_path, kv_window, kv_lazy_window, kv_lazy_alpha)
        except ValueError:
            calibrated = (kv_lazy_window, kv_lazy_alpha)
        settings = validate_settings(kv_eviction, kv_keep, kv_budget, kv_window, kv_sink, kv_granularity,
                                     kv_evict_every, kv_tiers, *calibrated)
        check_gguf_file(model_path)
        if kwargs.get("vocab_only"):
            # llama-cpp-python still creates a context, which llama.cpp aborts on for a weightless model
            raise ValueError("vocab_only=True is not supported by kvgguf.Llama (it needs a KV cache); use "
                             "llama_cpp.Llama for tokenization only")
        if "n_gpu_layers" not in kwargs and os.environ.get(GPU_LAYERS_ENV):
            kwargs["n_gpu_layers"] = gpu_layers_from_env()
        if rpc_servers is not None:
            rpc.add_servers(rpc_servers)
            if not kwargs.get("n_gpu_layers"):
                logger.warning("rpc_servers given with n_gpu_layers=0: every layer stays on this host")
        devices = rpc.load_devices(rpc_servers)   # only this model's servers (None: llama.cpp's default)
        with rpc.model_devices(devices):
            super().__init__(model_path, *args, **kwargs)
        n_layer = llama_cpp_api.llama_model_n_layer(self._model.model)
        n_head_kv = llama_cpp_api.llama_model_n_head_kv(self._model.model)
        n_head = llama_cpp_api.llama_model_n_head(self._model.model)
        arch = self.metadata.get("general.architecture", "")
        # a recurrent model (Mamba) has no attention heads: no KV cells, and eviction is refused (controller.check)
        head_k = int(self.metadata.get(f"{arch}.attention.key_length", self.n_embd() // n_head if n_head else 0))
        head_v = int(self.metadata.get(f"{arch}.attention.value_length", head_k))
        bytes_per_cell = kv_bytes_per_cell(n_layer, n_head_kv * head_k, n_head_kv * head_v,
                                           int(self.context_params.type_k), int(self.context_params.type_v))
        sequence = _Sequence(self)
        self.chat_template = ChatTemplate(self)
        engine = EvictionEngine(KVCacheView(self._ctx.ctx, SEQ_ID), n_layer, n_head_kv, bytes_per_cell)
        scoring = ScoringContext(sequence, n_layer, n_head_kv, self.chat_template)
        self.kv_controller = EvictionController(sequence, engine, scoring, self.chat_template)
        self._stack.callback(scoring.close)
        self._kv_contexts = ContextSession(self)
        self._lookahead_modules: dict[str, LookaheadRuntime] = {}
        self._stack.callback(self._close_lookahead_modules)
        self.kv_controller.configure(settings, head_profile=resolve_profile(kv_head_profile, model_path,
                                                                            self.model_identity()),
                                     lookahead=self._lookahead_for(kv_lookahead, settings))

    def close(self) -> None:
        # __del__ calls close() even when __init__ raised before the parent set anything up
        if "_stack" in self.__dict__:
            super().close()

    # --- configuration -----------------------------------------------------------------------------------------

    def configure_kv_eviction(self, kv_eviction: str | None, kv_keep: float | None = None,
                              kv_budget: int | None = None, kv_window: int | None = None,
                              kv_sink: int = DEFAULT_SINK, kv_granularity: str | None = None,
                              kv_evict_every: int | None = None,
                              kv_head_profile: str | os.PathLike[str] | None = AUTO,
                              kv_tiers: int | None = None,
                              kv_lookahead: str | os.PathLike[str] | None = None,
                              kv_lazy_window: int | None = None, kv_lazy_alpha: float | None = None) -> None:
        """Change the eviction settings of a loaded model; on ValueError the old settings stay in force."""
        kv_lazy_window, kv_lazy_alpha = lazy_defaults(kv_eviction, self.model_path, kv_window, kv_lazy_window,
                                                      kv_lazy_alpha)
        settings = validate_settings(kv_eviction, kv_keep, kv_budget, kv_window, kv_sink, kv_granularity,
                                     kv_evict_every, kv_tiers, kv_lazy_window, kv_lazy_alpha)
        profile = resolve_profile(kv_head_profile, self.model_path, self.model_identity())
        self.kv_controller.configure(settings, head_profile=profile,
                                     lookahead=self._lookahead_for(kv_lookahead, settings))
        self.reset()  # whatever the cache holds was made under other settings

    def _lookahead_for(self, spec: str | os.PathLike[str] | None,
                       settings: EvictionSettings | None) -> LookaheadRuntime | None:
        """The lookahead module ``kv_lookahead=spec`` names (None: the one shipped for this model, looked up only
        for a policy that scores with one), loaded once per file."""
        if spec is None and (settings is None or not policy_class(settings.policy_name).uses_lookahead):
            return None
        if spec is not None and not isinstance(spec, (str, os.PathLike)):
            raise ValueError(f"kv_lookahead must be the path of a converted lookahead module or None, got {spec!r}")
        key = "" if spec is None else os.fspath(spec)
        if key not in self._lookahead_modules:
            module = resolve_lookahead(spec, self.model_path, self._model.model)
            if module is None:
                return None
            self._lookahead_modules[key] = module
        return self._lookahead_modules[key]

    def _close_lookahead_modules(self) -> None:
        for module in self._lookahead_modules.values():
            module.close()
        self._lookahead_modules.clear()

    @property
    def kv_settings(self) -> EvictionSettings | None:
        return self.kv_controller.settings

    # With eviction, or a lossy cache restored (a compressed context), the context window (n_ctx cells) no longer
    # bounds the token positions: the parent's prompt-length check and max_tokens arithmetic must see the position
    # limit instead.
    @property
    def _n_ctx(self) -> int:
        n_ctx_cells = self.__dict__["_kv_n_ctx_cells"]
        controller = self.__dict__.get("kv_controller")
        contexts = self.__dict__.get("_kv_contexts")
        if controller is None or (controller.policy is None and not controller.lossy
                                  and (contexts is None or contexts.pending is None)):
            return n_ctx_cells
        return max(n_ctx_cells, self._model.n_ctx_train())

    @_n_ctx.setter
    def _n_ctx(self, value: int) -> None:
        self.__dict__["_kv_n_ctx_cells"] = value

    # --- statistics ----------------------------------------------------------------------------------------------

    def kv_stats(self) -> dict[str, Any]:
        """Cells before/after the last eviction, attention window, KV bytes held now and allocated; counted over
        the model's life (whichever cache evicted: the plain one or a tiered one): evictions, cells and bytes
        freed, time scoring/evicting/compacting; ``history``: one entry per eviction, the last 1000."""
        return self.kv_controller.stats()

    def kv_positions(self) -> np.ndarray:
        """Positions the cache holds for the model's sequence, ascending."""
        return self.kv_controller.engine.cache.positions()

    def kv_scores(self) -> dict[str, np.ndarray] | None:
        """The scores of the last eviction, as the policy produced them (before any token-level reduction):
        ``{"positions": [n_cells], "scores": [n_layer, n_head_kv, n_cells] or [n_cells]}``, and after an earlier
        per-head eviction ``"head_positions": [n_layer, n_head_kv, n_cells]`` (the token each head's cell held);
        None before the first eviction. Higher means more worth keeping."""
        return self.kv_controller.last_scores

    # --- llama-cpp-python's entry points -------------------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        if "kv_controller" in self.__dict__:
            self.kv_controller.reset()
            self.kv_controller.use_settings_tiers()

    def eval(self, tokens: Sequence[int]) -> None:
        self.kv_controller.eval(tokens)

    def generate(self, tokens: Sequence[int], *args: Any, reset: bool = True,
                 **kwargs: Any) -> Generator[int, Sequence[int] | None, None]:
        context = self._kv_contexts.take_pending(tokens, reset)
        if context is not None:
            # answering from a compressed context: its cache, then only the tokens after it
            self._kv_contexts.restore(context)
            return (yield from super().generate(list(tokens)[context.n_tokens:], *args, reset=False, **kwargs))
        controller = self.kv_controller
        if reset and (controller.policy is not None or controller.lossy):
            # a lossy cache is not a prefix of anything: start over instead of the parent's prefix matching
            self.reset()
        if reset:
            controller.begin_prompt()
        return (yield from super().generate(tokens, *args, reset=reset, **kwargs))

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        contexts = self.__dict__.get("_kv_contexts")
        tokens = contexts.tokens_for(text, special) if contexts is not None else None
        return tokens if tokens is not None else super().tokenize(text, add_bos=add_bos, special=special)

    def prefill(self, tokens: Sequence[int], reset: bool = True) -> None:
        """Decode ``tokens`` as a prompt: the cache is filled in chunks and, with a policy, evicted to the
        budget. With ``reset=False`` the tokens continue what the cache holds (e.g. after ``kv_restore``) and the
        budget applies to all of it. Continue with ``generate(more_tokens, reset=False)``: when the question comes
        in ``more_tokens``, this is query-agnostic compression (the policy never saw the question)."""
        if reset:
            self.reset()
        self.kv_controller.begin_prompt()
        self.eval(tokens)

    def _eval_growing(self, tokens: list[int]) -> None:
        """The parent's eval, with input_ids (and scores when logits_all) grown past n_ctx positions."""
        self._grow(self.n_tokens + len(tokens))
        super().eval(tokens)

    def _grow(self, needed: int) -> None:
        if needed > self.input_ids.shape[0]:
            grown = np.zeros(max(needed, 2 * self.input_ids.shape[0]), dtype=self.input_ids.dtype)
            grown[:self.n_tokens] = self.input_ids[:self.n_tokens]
            self.input_ids = grown
        if self._logits_all and needed > self.scores.shape[0]:
            grown_scores = np.zeros((max(needed, 2 * self.scores.shape[0]), self.scores.shape[1]),
                                    dtype=self.scores.dtype)
            grown_scores[:self.n_tokens] = self.scores[:self.n_tokens]
            self.scores = grown_scores

    # --- snapshots -------------------------------------------------------------------------------------------------

    def kv_snapshot(self) -> KVSnapshot:
        """A copy of what the model's sequence holds: llama.cpp's sequence state, the tokens decoded so far, and
        after a per-head eviction which token each (layer, KV head, cell) holds (llama.cpp's state format keeps
        one position per cell: the largest of its tokens')."""
        return self._kv_contexts.snapshot()

    def kv_restore(self, snapshot: KVSnapshot | CompressedContext) -> None:
        """Replace what the model's sequence holds by ``snapshot`` (taken from this model with the same context
        parameters) or by a compressed context; the next ``prefill(..., reset=False)`` or
        ``generate(..., reset=False)`` continues it."""
        self._kv_contexts.restore(snapshot)

    def kv_shift(self, delta: int, p0: int = 0, p1: int | None = None) -> None:
        """Move the cached tokens at positions [p0, p1) (p1: to the end) by ``delta``, as llama.cpp's context
        shift does (llama_memory_seq_add); input_ids and n_tokens follow. ValueError, nothing changed, for a
        range that holds a cell a per-head eviction filled (no single position), or positions that would fall
        below 0 or onto ones the cache holds."""
        self.kv_controller.shift(p0, self.n_tokens if p1 is None else p1, delta)

    # --- compressed contexts -----------------------------------------------------------------------------------

    def compress(self, context: str | Sequence[int], keep: float | None = None, budget: int | None = None,
                 system: str | None = None, policy: str | None = None, granularity: str | None = None,
                 progress: ProgressCallback | None = None) -> CompressedContext:
        """Prefill ``context`` and compress its cache before any question is known; returns a
        ``CompressedContext`` that ``ask`` and ``create_chat_completion(..., context=...)`` answer from.

        ``context`` as text becomes the start of a user turn of the model's chat template (after a system turn
        with ``system``, if given); questions continue that turn. As token ids it is used as given, and questions
        are appended as raw tokens. The policy, keep/budget and granularity default to this ``Llama``'s settings
        (kvzip, keep 0.5 when it has none); the template's tokens before the context are never evicted. The cache
        holds the compressed context afterwards, but the next call without ``context=`` starts over.
        ``progress(stage, done, total)`` is told the tokens decoded so far of each stage ("prefill", then the
        policy's scoring: "reconstruction" for kvzip)."""
        return self._kv_contexts.compress(context, keep, budget, system, policy, granularity, progress)

    def ask(self, context: CompressedContext, question: str | Sequence[int], **kwargs: Any) -> str:
        """Answer ``question`` from a compressed context and return the answer's text. ``kwargs`` are
        ``create_chat_completion``'s (``create_completion``'s for a context given as tokens), e.g. max_tokens,
        temperature. Every call starts from the context's cache: nothing of an earlier question remains."""
        return self._kv_contexts.ask(context, question, **kwargs)

    def create_completion(self, prompt: str | list[int], *args: Any, context: CompressedContext | None = None,
                          **kwargs: Any) -> Any:
        """llama_cpp.Llama.create_completion; with ``context=`` (from ``compress`` or ``load_context``) the prompt
        is asked about the compressed context and the answer starts from its cache: for a context compressed
        inside a chat, the prompt is the question of its user turn (the chat answer, in the text-completion shape,
        streamed too); for one compressed from token ids, the prompt's tokens follow the context's."""
        if context is None:
            return super().create_completion(prompt, *args, **kwargs)
        return self._kv_contexts.completion(prompt, args, context, kwargs)

    def create_chat_completion(self, messages: list[dict[str, Any]], *args: Any,
                               context: CompressedContext | None = None, **kwargs: Any) -> Any:
        """llama_cpp.Llama.create_chat_completion; with ``context=`` (from ``compress`` or ``load_context``) the
        first user message is asked about the compressed context (it continues the context's user turn) and
        the answer starts from the context's cache, formatted with the model's own chat template."""
        if context is None:
            return super().create_chat_completion(messages, *args, **kwargs)
        return self._kv_contexts.chat_completion(messages, args, context, kwargs)

    def load_context(self, path: str | os.PathLike[str]) -> CompressedContext:
        """Read a context written by ``CompressedContext.save``. ContextFileError (a ValueError) for a file that
        is not one, is truncated or corrupted, or was made with another model or KV cache type."""
        context = read_context_file(path)
        self._kv_contexts.check(context)
        return context

    def model_identity(self) -> ModelIdentity:
        """What a compressed context made with this model depends on (see ``kvgguf.contexts.ModelIdentity``)."""
        return self._kv_contexts.identity()

    def chat_formatter(self) -> Any:
        """The model's own chat template (from the GGUF metadata); ValueError if the file has none."""
        return self.chat_template.formatter()
