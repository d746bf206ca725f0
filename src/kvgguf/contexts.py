"""Compressed contexts: what ``Llama.compress`` returns, and their files.

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

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MAGIC = b"KVGGUFCX"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ")
_MAX_HEADER_BYTES = 1 << 24
_ARRAY_DTYPES = {"int32": np.int32, "float32": np.float32, "uint8": np.uint8}


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
class ChatLayout:
    """How questions join a context compressed inside a chat: the context is the start of a user turn.

    ``template_head`` is the chat template's text before the context (the system turn, the user header);
    questions follow the context in the same user turn after ``separator``."""

    template_head: str
    separator: str
    system: str | None


@dataclass(frozen=True)
class CompressedContext:
    """A compressed KV cache of one context, made by ``Llama.compress`` or ``Llama.load_context``.

    Answer from it with ``Llama.ask`` or ``Llama.create_chat_completion(..., context=...)``; every answer starts
    from this same cache. ``save(path)`` writes it to a file."""

    state: bytes                                   # llama.cpp's sequence state (llama_state_seq_get_data)
    tokens: npt.NDArray[np.int32]                  # the context's token ids, one per position
    positions: npt.NDArray[np.int32]               # [n_cells] the positions the cells hold (a cell's largest)
    head_positions: npt.NDArray[np.int32] | None   # [n_layer, n_head_kv, n_cells] per head, after a head eviction
    scores: npt.NDArray[np.float32] | None         # [n_layer, n_head_kv, n_cells] the policy's score of each
                                                   # (layer, KV head, cell)'s token; None if nothing was evicted
    model: ModelIdentity
    policy: str | None
    granularity: str | None
    keep: float | None                             # the requested fraction (None when a budget was given)
    budget: int | None
    n_protected: int                               # cells at the start kept unconditionally (template, system)
    chat: ChatLayout | None                        # None: questions are appended as raw tokens

    @property
    def n_tokens(self) -> int:
        """Tokens of the context (its positions run from 0 to n_tokens - 1)."""
        return int(self.tokens.size)

    @property
    def n_cells(self) -> int:
        """KV cells the compressed cache holds."""
        return int(self.positions.size)

    @property
    def kept_ratio(self) -> float:
        """Cells kept / tokens of the context."""
        return self.n_cells / max(1, self.n_tokens)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the context to ``path`` (see the module docstring for the layout); returns the path."""
        arrays: dict[str, np.ndarray] = {"state": np.frombuffer(self.state, dtype=np.uint8),
                                         "tokens": self.tokens, "positions": self.positions}
        for name in ("head_positions", "scores"):
            value = getattr(self, name)
            if value is not None:
                arrays[name] = value
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
        arrays = {name: _array(payload, entry) for name, entry in entries.items()}
        chat = header["chat"]
        return CompressedContext(
            state=arrays["state"].tobytes(), tokens=arrays["tokens"], positions=arrays["positions"],
            head_positions=arrays.get("head_positions"), scores=arrays.get("scores"),
            model=ModelIdentity(**header["model"]), policy=header["policy"], granularity=header["granularity"],
            keep=header["keep"], budget=header["budget"],
            n_protected=int(header["n_protected"]), chat=None if chat is None else ChatLayout(**chat))
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
