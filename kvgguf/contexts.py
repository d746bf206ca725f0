"""Compressed contexts: what ``Llama.compress`` returns, their files, and answering from them; snapshots.

A ``CompressedContext`` is a compressed KV cache that answers any number of questions: llama.cpp's state of the
model's sequence (cells with their K/V rows), the token ids of the context, the per-head layout of the cells after a
head-granular eviction, the policy's scores, and how the questions join the context (a user turn of the model's
chat template, or raw tokens).

File layout (little-endian): the magic ``KVGGUFCX``, a u32 format version, a u64 header length, the header (UTF-8
JSON: model identity, settings, kept ratio, chat layout, and one entry per array with its dtype, shape, offset and
length in the payload), then the payload. The header holds the payload's SHA-256, so a truncated or corrupted file
is refused before any byte reaches llama.cpp.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._native import BUILD_INFO, llama_cpp, llama_cpp_api
from .chat import CONTEXT_MARK, ChatLayout
from .scoring import ProgressCallback
from .settings import DEFAULT_SINK, DEFAULT_WINDOW, validate_settings
from .tiers import KVTierLayout, TierPlan

if TYPE_CHECKING:
    from .llama import Llama

MAGIC = b"KVGGUFCX"
FORMAT_VERSION = 2  # 2: the header records the library (llama.cpp and patch set) that wrote the state
_PREAMBLE = struct.Struct("<8sIQ")
_MAX_HEADER_BYTES = 1 << 24
_ARRAY_DTYPES = {"int32": np.int32, "float32": np.float32, "float64": np.float64, "uint8": np.uint8}


class ContextFileError(ValueError):
    """A compressed-context file that can not be loaded (not ours, truncated, corrupted, another version)."""


@dataclass(frozen=True)
class ModelIdentity:
    """What a compressed cache depends on: the model's weights and shapes, and the cache's element types."""

    fingerprint: str   # SHA-256 over the GGUF file's size, its first 4 MiB and 16 samples of its tensor data
    name: str
    architecture: str
    n_layer: int
    n_head_kv: int
    n_embd: int
    n_vocab: int
    type_k: int
    type_v: int

    def mismatch(self, other: ModelIdentity) -> str | None:
        """A sentence naming the first difference to ``other``, or None when a cache of one fits the other."""
        for field in ("fingerprint", "n_layer", "n_head_kv", "n_embd", "n_vocab", "type_k", "type_v"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                what = "model file" if field == "fingerprint" else field
                return (f"{what} differs: the context was made with {theirs!r} ({other.name or other.architecture}), "
                        f"this model has {mine!r} ({self.name or self.architecture})")
        return None


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap identity of a (large) model file: its size, first 4 MiB and 16 spread 64 KiB samples."""
    head_bytes, sample_bytes, n_samples = 4 << 20, 64 << 10, 16
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    digest.update(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(head_bytes))
        for i in range(n_samples):
            handle.seek(head_bytes + (max(size - head_bytes - sample_bytes, 0) * i) // n_samples)
            digest.update(handle.read(sample_bytes))
    return digest.hexdigest()


@dataclass(frozen=True)
class CompressedContext:
    """A compressed KV cache of one context, made by ``Llama.compress`` or ``Llama.load_context``.

    Answer from it with ``Llama.ask`` or ``Llama.create_chat_completion(..., context=...)``; every answer starts
    from this same cache. ``save(path)`` writes it to a file."""

    state: bytes                                   # llama.cpp's sequence state (llama_state_seq_get_data)
    tokens: npt.NDArray[np.int32]                  # the context's token ids, one per position
    positions: npt.NDArray[np.int32]               # [n_cells] the positions the cells hold (a cell's largest)
    head_positions: Any                            # after a head eviction, which token each head's cell holds:
                                                   # [n_layer, n_head_kv, n_cells], or per tier of a tiered
                                                   # cache [n_heads_of_tier, n] (or None); else None
    scores: npt.NDArray[np.float32] | None         # [n_layer, n_head_kv, n_cells] the policy's score of each
                                                   # (layer, KV head, cell)'s token; None if nothing was evicted
    model: ModelIdentity
    policy: str | None
    granularity: str | None
    keep: float | None                             # the requested fraction (None when a budget was given)
    budget: int | None
    n_protected: int                               # cells at the start kept unconditionally (template, system)
    chat: ChatLayout | None                        # None: questions are appended as raw tokens
    tiers: TierPlan | None = None                  # the tiered cache the state is for (None: a plain cache)
    tier_held: npt.NDArray[np.integer] | None = None  # [n_tiers] the cells each tier holds (a tiered cache)

    @property
    def n_tokens(self) -> int:
        """Tokens of the context (its positions run from 0 to n_tokens - 1)."""
        return int(self.tokens.size)

    @property
    def n_cells(self) -> int:
        """KV cells the compressed cache holds; in a tiered cache, the tokens that some head of some tier holds
        (its memory is ``kept_ratio``)."""
        return int(self.positions.size)

    @property
    def kept_ratio(self) -> float:
        """The share of a full cache's K/V that the context keeps: cells kept / tokens of the context. In a
        tiered cache, whose tiers hold different numbers of cells: the (layer, KV head, cell) entries the tiers
        hold / (every head holding every token)."""
        if self.tiers is not None and self.tier_held is not None:
            tier_of_head = self.tiers.layout.tier_of_head
            heads = np.bincount(tier_of_head.ravel(), minlength=len(self.tier_held))
            return float(heads @ self.tier_held) / (tier_of_head.size * max(1, self.n_tokens))
        return self.n_cells / max(1, self.n_tokens)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the context to ``path`` (see the module docstring for the layout); returns the path."""
        arrays: dict[str, np.ndarray] = {"state": np.frombuffer(self.state, dtype=np.uint8),
                                         "tokens": self.tokens, "positions": self.positions}
        if self.scores is not None:
            arrays["scores"] = self.scores
        arrays.update(_layout_arrays(self.head_positions, self.tiers, self.tier_held))
        entries, chunks, offset = {}, [], 0
        for name, array in arrays.items():
            data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entries[name] = {"dtype": str(array.dtype), "shape": list(array.shape), "offset": offset,
                             "nbytes": len(data)}
            chunks.append(data)
            offset += len(data)
        payload = b"".join(chunks)
        header = {
            "model": self.model.__dict__, "policy": self.policy, "granularity": self.granularity,
            "keep": self.keep, "budget": self.budget, "n_protected": self.n_protected,
            "kept_ratio": self.kept_ratio, "n_tokens": self.n_tokens, "n_cells": self.n_cells,
            "chat": None if self.chat is None else self.chat.__dict__,
            "library": library_identity(),
            "arrays": entries, "payload_sha256": hashlib.sha256(payload).hexdigest(),
        }
        header_bytes = json.dumps(header).encode()
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header_bytes)))
            handle.write(header_bytes)
            handle.write(payload)
        os.replace(tmp, path)
        return path


def _layout_arrays(head_positions: Any, tiers: TierPlan | None,
                   tier_held: npt.NDArray[np.integer] | None) -> dict[str, np.ndarray]:
    """The arrays a context file keeps of its per-head layout and, for a tiered cache, of its tiers."""
    if tiers is None:
        return {} if head_positions is None else {"head_positions": head_positions}
    arrays = {"tier_cells": np.asarray(tiers.layout.n_cells, dtype=np.int32),
              "tier_of_head": tiers.layout.tier_of_head, "tier_keep": tiers.keep_fraction.astype(np.float64)}
    for tier, tokens in enumerate(head_positions or []):
        if tokens is not None:
            arrays[f"tier_tokens_{tier}"] = tokens
    if tier_held is not None:
        arrays["tier_held"] = np.asarray(tier_held, dtype=np.int32)
    return arrays


def _layout_from(arrays: dict[str, np.ndarray]) -> tuple[Any, TierPlan | None]:
    if "tier_cells" not in arrays:
        return arrays.get("head_positions"), None
    plan = TierPlan(KVTierLayout(tuple(int(n) for n in arrays["tier_cells"]), arrays["tier_of_head"]),
                    arrays["tier_keep"])
    return [arrays.get(f"tier_tokens_{tier}") for tier in range(plan.layout.n_tiers)], plan


def library_identity() -> dict[str, Any]:
    """Which llama.cpp and patch set built the library whose state a context file holds."""
    return {key: BUILD_INFO[key] for key in ("llama_cpp_python", "patches", "patch_set")}


def _check_library(path: Path, written_by: dict[str, Any]) -> None:
    ours = library_identity()
    if written_by.get("patch_set") == ours["patch_set"]:
        return
    theirs = written_by.get("patches", [])
    differ = sorted(set(theirs) ^ set(ours["patches"])) or ["(same names, other contents)"]
    raise ContextFileError(
        f"{str(path)!r} holds llama.cpp state written by a kvgguf library built from llama-cpp-python "
        f"{written_by.get('llama_cpp_python')} with patch set {str(written_by.get('patch_set'))[:12]}; this one is "
        f"{ours['llama_cpp_python']} with patch set {ours['patch_set'][:12]} (patches that differ: "
        f"{', '.join(differ)}): compress the context again with this kvgguf")


def read_context_file(path: str | os.PathLike[str]) -> CompressedContext:
    """Read a file written by ``CompressedContext.save``; ContextFileError if it is not one, or is damaged."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ContextFileError(f"cannot read context file {str(path)!r}: {err}") from err
    if len(data) < _PREAMBLE.size or data[:len(MAGIC)] != MAGIC:
        raise ContextFileError(f"{str(path)!r} is not a kvgguf context file (no {MAGIC.decode()} magic)")
    _, version, header_len = _PREAMBLE.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ContextFileError(f"{str(path)!r} has context file format version {version}; this kvgguf reads "
                               f"version {FORMAT_VERSION}")
    start = _PREAMBLE.size
    if header_len > _MAX_HEADER_BYTES or start + header_len > len(data):
        raise ContextFileError(f"{str(path)!r} is truncated (its header needs {header_len} bytes)")
    try:
        header = json.loads(data[start:start + header_len])
        payload = data[start + header_len:]
        entries = header["arrays"]
        expected = sum(int(entry["nbytes"]) for entry in entries.values())
        if len(payload) != expected:
            raise ContextFileError(f"{str(path)!r} is truncated or has trailing bytes: payload of {len(payload)} "
                                   f"bytes, the header says {expected}")
        if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
            raise ContextFileError(f"{str(path)!r} is corrupted (the payload's SHA-256 does not match its header)")
        _check_library(path, header["library"])
        arrays = {name: _array(payload, entry) for name, entry in entries.items()}
        chat = header["chat"]
        head_positions, tiers = _layout_from(arrays)
        return CompressedContext(
            state=arrays["state"].tobytes(), tokens=arrays["tokens"], positions=arrays["positions"],
            head_positions=head_positions, scores=arrays.get("scores"),
            model=ModelIdentity(**header["model"]), policy=header["policy"], granularity=header["granularity"],
            keep=header["keep"], budget=header["budget"],
            n_protected=int(header["n_protected"]), chat=None if chat is None else ChatLayout(**chat), tiers=tiers,
            tier_held=arrays.get("tier_held") if tiers is not None else None)
    except ContextFileError:
        raise
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ContextFileError(f"{str(path)!r} has a malformed header: {err}") from err


def _array(payload: bytes, entry: dict[str, Any]) -> np.ndarray:
    dtype = _ARRAY_DTYPES[entry["dtype"]]
    offset, nbytes = int(entry["offset"]), int(entry["nbytes"])
    shape = tuple(int(n) for n in entry["shape"])
    if offset < 0 or offset + nbytes > len(payload) or int(np.prod(shape)) * np.dtype(dtype).itemsize != nbytes:
        raise ValueError(f"array entry {entry} does not fit the payload")
    return np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<"), count=nbytes // np.dtype(dtype).itemsize,
                         offset=offset).astype(dtype).reshape(shape)


@dataclass(frozen=True)
class KVSnapshot:
    """What ``Llama.kv_snapshot`` copied: llama.cpp's state of the model's sequence (its cells, K and V rows) and
    the token ids decoded so far."""

    data: bytes
    tokens: np.ndarray
    head_positions: Any = None      # [n_layer, n_head_kv, n] tokens of the head-mixed cells per head (per tier of
                                    # a tiered cache: a list of [n_heads_of_tier, n] or None)
    tiers: TierPlan | None = None   # the tiered cache the state is for (None: the plain cache)


def read_sequence_state(ctx: Any, seq_id: int) -> bytes:
    """llama.cpp's state of one sequence (llama_state_seq_get_data)."""
    size = llama_cpp_api.llama_state_seq_get_size(ctx, seq_id)
    buffer = (ctypes.c_uint8 * size)()
    written = llama_cpp_api.llama_state_seq_get_data(ctx, buffer, size, seq_id)
    if written == 0 and size > 0:
        raise RuntimeError("llama_state_seq_get_data copied nothing")
    return bytes(buffer[:written])


def write_sequence_state(ctx: Any, seq_id: int, data: bytes) -> None:
    """Put ``data`` from ``read_sequence_state`` back; ValueError if it does not fit this context's cache."""
    if not data:
        return
    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    if llama_cpp_api.llama_state_seq_set_data(ctx, buffer, len(data), seq_id) == 0:
        raise ValueError("the snapshot does not fit this model's cache (another model, or fewer cells)")


def _starts_with(tokens: Sequence[int], prefix: np.ndarray) -> bool:
    return len(tokens) > prefix.size and np.array_equal(np.asarray(tokens[:prefix.size]), prefix)


class ContextSession:
    """A ``kvgguf.Llama``'s compressed contexts: ``compress``, answering from one (``ask``, a chat completion
    with ``context=``), and the context the next ``generate`` starts from."""

    def __init__(self, llm: Llama) -> None:
        self.llm = llm
        self.pending: CompressedContext | None = None  # the next generate() starts from it
        self._chat_handler: Any = None
        self._identity: ModelIdentity | None = None

    # --- making one ---------------------------------------------------------------------------------------------

    def compress(self, context: str | Sequence[int], keep: float | None, budget: int | None, system: str | None,
                 policy: str | None, granularity: str | None,
                 progress: ProgressCallback | None = None) -> CompressedContext:
        llm = self.llm
        controller = llm.kv_controller
        tokens, chat, n_protected = self._context_tokens(context, system)
        base = controller.settings
        name = policy if policy is not None else (base.policy_name if base is not None else "kvzip")
        same_policy = base is not None and base.policy_name == name
        if keep is None and budget is None and same_policy:
            keep, budget = base.keep, base.budget
        if granularity is None and same_policy:
            granularity = base.granularity
        window = base.window if base is not None else DEFAULT_WINDOW
        sink = max(base.sink if base is not None else DEFAULT_SINK, n_protected)
        settings = validate_settings(name, keep, budget, window, sink, granularity)
        if same_policy:
            settings = replace(settings, tiers=base.tiers)
        controller.scoring.progress = progress
        try:
            with controller.using(settings, head=n_protected) as active:
                llm.prefill(tokens)
                snapshot = llm.kv_snapshot()
                positions = llm.kv_positions().copy()
                tier_held = controller.engine.tier_cells() if controller.tiered else None
                scores = active.kept_scores()
                if scores is not None and scores.shape[2] != positions.size:
                    scores = None  # nothing was evicted (the context fits the budget)
        finally:
            controller.scoring.progress = None
            llm.reset()
        return CompressedContext(
            state=snapshot.data, tokens=snapshot.tokens.astype(np.int32), positions=positions,
            head_positions=snapshot.head_positions, scores=scores, model=self.identity(), policy=name,
            granularity=settings.granularity, keep=settings.keep, budget=settings.budget, n_protected=n_protected,
            chat=chat, tiers=snapshot.tiers, tier_held=tier_held)

    def _context_tokens(self, context: str | Sequence[int],
                        system: str | None) -> tuple[list[int], ChatLayout | None, int]:
        """The tokens to compress, how questions join them, and how many template tokens lead them."""
        llm = self.llm
        if isinstance(context, str):
            if not context:
                raise ValueError("the context is empty")
            if system is not None and not isinstance(system, str):
                raise ValueError(f"system must be a string, got {type(system).__name__}")
            if not llm.chat_template.has_template:
                if system is not None:
                    raise ValueError("system= needs a chat template; this GGUF file has none")
                return llm.tokenize(context.encode(), add_bos=True, special=False), None, 0
            chat, head = llm.chat_template.user_turn_head(system)
            body = llm.tokenize(context.encode(), add_bos=False, special=False)
            return head + body, chat, len(head)
        if system is not None:
            raise ValueError("system= needs the context as text (token ids are used as given)")
        tokens = self.checked_tokens(context, "context")
        if not tokens:
            raise ValueError("the context is empty")
        return tokens, None, 0

    def checked_tokens(self, tokens: Sequence[int], what: str) -> list[int]:
        try:
            ids = [int(t) for t in tokens]
        except (TypeError, ValueError) as err:
            raise ValueError(f"the {what} must be text or a sequence of token ids: {err}") from err
        n_vocab = self.llm.n_vocab()
        bad = [t for t in ids if not 0 <= t < n_vocab]
        if bad:
            raise ValueError(f"the {what} has token ids outside [0, {n_vocab}): {bad[:5]}")
        return ids

    # --- answering from one -------------------------------------------------------------------------------------

    def ask(self, context: CompressedContext, question: str | Sequence[int], **kwargs: Any) -> str:
        llm = self.llm
        self.check(context)
        if kwargs.get("stream"):
            raise ValueError("ask() returns the whole answer; for stream=True use "
                             "create_chat_completion(messages, context=..., stream=True)")
        if context.chat is not None:
            if not isinstance(question, str):
                raise ValueError("this context continues a chat turn: ask() takes the question as text")
            response = llm.create_chat_completion([{"role": "user", "content": question}], context=context, **kwargs)
            return response["choices"][0]["message"]["content"] or ""
        if isinstance(question, str):
            question_tokens = llm.tokenize(question.encode(), add_bos=False, special=True)
        else:
            question_tokens = self.checked_tokens(question, "question")
        if not question_tokens:
            raise ValueError("the question is empty")
        self.pending = context
        completion = llm.create_completion(context.tokens.tolist() + question_tokens, **kwargs)
        return completion["choices"][0]["text"]

    def completion(self, prompt: str | Sequence[int], args: tuple, context: CompressedContext,
                   kwargs: dict[str, Any]) -> Any:
        """A text completion of ``prompt`` asked about the context: for a context compressed inside a chat, the
        prompt is the question of its user turn and the chat answer comes back as a text completion (streamed
        too); for one compressed from token ids, the prompt's tokens follow the context's."""
        self.check(context)
        if args:
            raise ValueError("with context=, pass create_completion's options by name")
        if context.chat is None:
            if isinstance(prompt, str):
                prompt_tokens = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
            else:
                prompt_tokens = self.checked_tokens(prompt, "prompt")
            if not prompt_tokens:
                raise ValueError("the prompt is empty")
            self.pending = context
            return self.llm.create_completion(context.tokens.tolist() + prompt_tokens, **kwargs)
        if not isinstance(prompt, str):
            raise ValueError("this context continues a chat turn: the prompt is the question, as text")
        for option in ("suffix", "echo"):
            if kwargs.pop(option, None):
                raise ValueError(f"{option}= is not supported with a context compressed inside a chat")
        if kwargs.pop("logprobs", None) is not None:
            raise ValueError("logprobs= is not supported with a context compressed inside a chat")
        answer = self.chat_completion([{"role": "user", "content": prompt}], (), context, kwargs)
        if kwargs.get("stream"):
            return (_chat_chunk_as_text(chunk) for chunk in answer)
        return _chat_response_as_text(answer)

    def chat_completion(self, messages: list[dict[str, Any]], args: tuple, context: CompressedContext,
                        kwargs: dict[str, Any]) -> Any:
        """A chat completion whose first user message continues the context's user turn."""
        self.check(context)
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
        formatter = self.llm.chat_template.formatter()
        prompt = formatter(messages=joined).prompt
        if not prompt.startswith(context.chat.template_head + CONTEXT_MARK):
            raise ValueError("the chat template puts these messages somewhere else than the compressed context "
                             "(a system message? give it to compress(system=...))")
        if self._chat_handler is None:
            self._chat_handler = formatter.to_chat_handler()
        # the handler tokenizes the formatted prompt; tokenize() hands back the context's own tokens for it
        self.pending = context
        return self._chat_handler(llama=self.llm, messages=joined, **kwargs)

    def tokens_for(self, text: bytes, special: bool) -> list[int] | None:
        """The pending context's tokens and the rest of ``text``, when ``text`` is a chat prompt formatted
        around it (see ``chat_completion``); None otherwise."""
        context = self.pending
        if context is None or context.chat is None:
            return None
        head = (context.chat.template_head + CONTEXT_MARK).encode()
        if not text.startswith(head):
            return None
        rest = llama_cpp.Llama.tokenize(self.llm, text[len(head):], add_bos=False, special=special)
        return context.tokens.tolist() + rest

    def take_pending(self, tokens: Sequence[int], reset: bool) -> CompressedContext | None:
        """The pending context, if ``generate(tokens, reset)`` answers from it; clears it either way."""
        context, self.pending = self.pending, None
        if context is not None and reset and _starts_with(tokens, context.tokens):
            return context
        return None

    # --- snapshots ----------------------------------------------------------------------------------------------

    def snapshot(self) -> KVSnapshot:
        llm = self.llm
        llm._ctx.kv_cache_seq_rm(llm.kv_controller.host.seq_id, llm.n_tokens, -1)  # stale after reset()
        data = read_sequence_state(llm.ctx, llm.kv_controller.host.seq_id)
        return KVSnapshot(data=data, tokens=llm.input_ids[:llm.n_tokens].copy(),
                          head_positions=llm.kv_controller.engine.layout_state(), tiers=llm.kv_controller.tier_plan)

    def restore(self, snapshot: KVSnapshot | CompressedContext) -> None:
        if isinstance(snapshot, CompressedContext):
            return self._restore_context(snapshot)
        if not isinstance(snapshot, KVSnapshot):
            raise ValueError(f"kv_restore() takes a KVSnapshot or a CompressedContext, got {type(snapshot).__name__}")
        llm = self.llm
        seq_id = llm.kv_controller.host.seq_id
        llm.reset()
        llm.kv_controller.use_tiers(snapshot.tiers)  # the state is read back only into the same tiers
        llm._ctx.kv_cache_seq_rm(seq_id, -1, -1)
        write_sequence_state(llm.ctx, seq_id, snapshot.data)
        n_tokens = int(snapshot.tokens.size)
        llm.kv_controller.host.grow(n_tokens)
        llm.input_ids[:n_tokens] = snapshot.tokens
        llm.n_tokens = n_tokens
        engine = llm.kv_controller.engine
        engine.restore_layout(snapshot.head_positions)
        llm.kv_controller.restored(engine.cache.n_cells() < n_tokens or snapshot.head_positions is not None)
        return None

    def _restore_context(self, context: CompressedContext) -> None:
        self.check(context)
        self.restore(KVSnapshot(data=context.state, tokens=context.tokens, head_positions=context.head_positions,
                                tiers=context.tiers))
        if not np.array_equal(self.llm.kv_positions(), context.positions):
            raise ContextFileError("the restored cache does not hold the positions the context file lists")
        self.llm.kv_controller.restored(True, context.n_protected, context.policy, context.scores)

    # --- checks -------------------------------------------------------------------------------------------------

    def identity(self) -> ModelIdentity:
        """What a compressed context made with this model depends on."""
        if self._identity is None:
            llm = self.llm
            engine = llm.kv_controller.engine
            self._identity = ModelIdentity(
                fingerprint=file_fingerprint(llm.model_path), name=str(llm.metadata.get("general.name", "")),
                architecture=str(llm.metadata.get("general.architecture", "")), n_layer=engine.n_layer,
                n_head_kv=engine.n_head_kv, n_embd=llm.n_embd(), n_vocab=llm.n_vocab(),
                type_k=int(llm.context_params.type_k), type_v=int(llm.context_params.type_v))
        return self._identity

    def check(self, context: CompressedContext) -> None:
        if not isinstance(context, CompressedContext):
            raise ValueError(f"expected a CompressedContext (from compress() or load_context()), got "
                             f"{type(context).__name__}")
        mismatch = self.identity().mismatch(context.model)
        if mismatch is not None:
            raise ContextFileError(f"the compressed context does not fit this model: {mismatch}")
        n_ctx = self.llm.n_ctx()
        if context.tiers is None and context.n_cells + 1 > n_ctx:
            raise ValueError(f"the compressed context holds {context.n_cells} cells; this Llama's n_ctx="
                             f"{n_ctx} leaves no room to answer: use n_ctx > {context.n_cells}")


def _chat_response_as_text(response: dict[str, Any]) -> dict[str, Any]:
    """A chat completion in llama-cpp-python's text-completion shape."""
    choice = response["choices"][0]
    return {"id": response["id"].replace("chatcmpl", "cmpl", 1), "object": "text_completion",
            "created": response["created"], "model": response["model"],
            "choices": [{"text": choice["message"]["content"] or "", "index": 0, "logprobs": None,
                         "finish_reason": choice["finish_reason"]}],
            "usage": response["usage"]}


def _chat_chunk_as_text(chunk: dict[str, Any]) -> dict[str, Any]:
    """A streamed chat completion chunk in the text-completion chunk shape."""
    choice = chunk["choices"][0]
    return {"id": chunk["id"].replace("chatcmpl", "cmpl", 1), "object": "text_completion",
            "created": chunk["created"], "model": chunk["model"],
            "choices": [{"text": choice["delta"].get("content") or "", "index": 0, "logprobs": None,
                         "finish_reason": choice["finish_reason"]}]}
