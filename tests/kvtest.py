"""Test helpers: raw llama.cpp contexts on the real model, through kvgguf's patched library (no mocks)."""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import numpy as np

import kvgguf  # (must come before llama_cpp)
import kvgguf._native
from kvgguf._native import llama_cpp_api as C
from kvgguf.engine import KVCacheView

GGML_TYPE_F16 = 1
GGML_TYPE_Q8_0 = 8


class RawModel:
    """A llama_model loaded once, shared by many contexts."""

    def __init__(self, path: str) -> None:
        C.llama_backend_init()
        params = C.llama_model_default_params()
        self.model = C.llama_model_load_from_file(path.encode(), params)
        assert self.model, f"failed to load {path}"
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.n_layer = C.llama_model_n_layer(self.model)
        self.n_head_kv = C.llama_model_n_head_kv(self.model)

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        raw = text.encode()
        buf = (C.llama_token * (len(raw) + 16))()
        n = C.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), add_special, True)
        assert n >= 0
        return list(buf[:n])

    def close(self) -> None:
        C.llama_model_free(self.model)


class RawContext:
    """A llama_context with explicit positions and sequence ids, for checks the Llama class cannot express."""

    def __init__(self, model: RawModel, n_ctx: int = 1024, flash_attn: bool = False, n_seq_max: int = 1,
                 type_k: int = GGML_TYPE_F16, type_v: int = GGML_TYPE_F16, n_batch: int = 512,
                 n_ubatch: int | None = None, cb_eval=None) -> None:
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch or n_batch
        params.n_seq_max = n_seq_max
        params.n_threads = 2
        params.n_threads_batch = 2
        params.flash_attn_type = 1 if flash_attn else 0
        params.type_k = type_k
        params.type_v = type_v
        params.kv_unified = True
        if cb_eval is not None:
            self._cb_eval = C.ggml_backend_sched_eval_callback(cb_eval)  # keep the thunk alive
            params.cb_eval = self._cb_eval
        self.model = model
        self.n_batch = n_batch
        self.ctx = C.llama_init_from_model(model.model, params)
        assert self.ctx
        self.mem = C.llama_get_memory(self.ctx)
        self.batch = C.llama_batch_init(n_batch, 0, n_seq_max)

    def view(self, seq_id: int = 0) -> KVCacheView:
        return KVCacheView(self.ctx, seq_id)

    def decode(self, tokens: list[int], positions: list[int] | None = None, seq_ids: tuple[int, ...] = (0,)) -> np.ndarray:
        """Decode tokens (default positions: after the sequence's newest); return the last token's logits."""
        if positions is None:
            start = C.llama_memory_seq_pos_max(self.mem, seq_ids[0]) + 1
            positions = list(range(start, start + len(tokens)))
        for begin in range(0, len(tokens), self.n_batch):
            end = min(len(tokens), begin + self.n_batch)
            b = self.batch
            b.n_tokens = end - begin
            for i in range(begin, end):
                j = i - begin
                b.token[j] = tokens[i]
                b.pos[j] = positions[i]
                b.n_seq_id[j] = len(seq_ids)
                for k, s in enumerate(seq_ids):
                    b.seq_id[j][k] = s
                b.logits[j] = i == len(tokens) - 1
            rc = C.llama_decode(self.ctx, b)
            assert rc == 0, f"llama_decode returned {rc}"
        logits = C.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.model.n_vocab,)).copy()

    def save(self) -> bytes:
        size = C.llama_state_get_size(self.ctx)
        buf = (ctypes.c_uint8 * size)()
        n = C.llama_state_get_data(self.ctx, buf, size)
        return bytes(buf[:n])

    def load(self, state: bytes) -> None:
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        assert C.llama_state_set_data(self.ctx, buf, len(state)) == len(state)

    def seq_state(self, seq_id: int = 0) -> "SeqState":
        size = C.llama_state_seq_get_size(self.ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = C.llama_state_seq_get_data(self.ctx, buf, size, seq_id)
        return SeqState.parse(bytes(buf[:n]))

    def close(self) -> None:
        C.llama_batch_free(self.batch)
        C.llama_free(self.ctx)


@dataclass
class SeqState:
    """K/V rows of one sequence, parsed from llama_state_seq_get_data (single stream, no cell ext)."""

    positions: np.ndarray   # [n_cells]
    k: np.ndarray           # [n_layer, n_cells, k_row_bytes] raw bytes
    v: np.ndarray           # [n_layer, n_cells, v_row_bytes] raw bytes (un-transposed when the cache is)

    @classmethod
    def parse(cls, data: bytes) -> "SeqState":
        off = 0

        def take(fmt: str):
            nonlocal off
            values = struct.unpack_from(fmt, data, off)
            off += struct.calcsize(fmt)
            return values

        take("<Ii")  # io magic, seq_id
        (n_stream,) = take("<I")
        assert n_stream == 1
        (n_cells,) = take("<I")
        positions = []
        for _ in range(n_cells):
            pos, n_seq = take("<iI")
            take(f"<{n_seq}i")
            positions.append(pos)
        v_trans, n_layer = take("<II")
        ks = []
        for _ in range(n_layer):
            _, row = take("<iQ")
            ks.append(np.frombuffer(data, np.uint8, n_cells * row, off).reshape(n_cells, row))
            off += n_cells * row
        vs = []
        for _ in range(n_layer):
            if not v_trans:
                _, row = take("<iQ")
                vs.append(np.frombuffer(data, np.uint8, n_cells * row, off).reshape(n_cells, row))
                off += n_cells * row
            else:
                _, el, n_embd = take("<iII")
                block = np.frombuffer(data, np.uint8, n_embd * n_cells * el, off).reshape(n_embd, n_cells, el)
                off += n_embd * n_cells * el
                vs.append(np.ascontiguousarray(block.transpose(1, 0, 2)).reshape(n_cells, n_embd * el))
        assert off == len(data), (off, len(data))
        return cls(np.array(positions, dtype=np.int32), np.stack(ks), np.stack(vs))


class GGMLTensorHead(ctypes.Structure):
    """The leading fields of struct ggml_tensor (ggml.h): type, buffer, ne[4], nb[4]."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


_libggml_base = ctypes.CDLL(str(kvgguf._native.LIB_DIR / "libggml-base.so"))
_libggml_base.ggml_get_name.argtypes = [ctypes.c_void_p]
_libggml_base.ggml_get_name.restype = ctypes.c_char_p
_libggml_base.ggml_nbytes.argtypes = [ctypes.c_void_p]
_libggml_base.ggml_nbytes.restype = ctypes.c_size_t
_libggml_base.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_libggml_base.ggml_backend_tensor_get.restype = None


class SoftMaxCapture:
    """A cb_eval callback that copies llama.cpp's own kq_soft_max-<il> tensors (non-flash attention path)."""

    def __init__(self) -> None:
        self.calls: list[dict[int, np.ndarray]] = [{}]   # one dict per ubatch: layer -> [n_head, n_tokens, n_kv]

    def new_ubatch(self) -> None:
        self.calls.append({})

    def __call__(self, tensor: int, ask: bool, user_data) -> bool:
        name = _libggml_base.ggml_get_name(tensor).decode()
        if not name.startswith("kq_soft_max-"):
            return False
        if ask:
            return True
        head = GGMLTensorHead.from_address(tensor)
        assert head.type == 0  # f32
        data = np.empty(_libggml_base.ggml_nbytes(tensor) // 4, dtype=np.float32)
        _libggml_base.ggml_backend_tensor_get(tensor, data.ctypes.data, 0, data.nbytes)
        n_kv, n_tok, n_head = head.ne[0], head.ne[1], head.ne[2]
        layer = int(name.split("-")[1])
        if layer in self.calls[-1]:
            self.calls.append({})
        self.calls[-1][layer] = data.reshape(n_head, n_tok, n_kv).copy()
        return True
