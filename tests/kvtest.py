"""Test helpers: raw llama.cpp contexts on the real model, through kvgguf's patched library (no mocks)."""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import numpy as np

import kvgguf  # (must come before llama_cpp)
import kvgguf._native
import kvgguf.tiers
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
        self.layout: kvgguf.tiers.KVTierLayout | None = None
        self.batch = C.llama_batch_init(n_batch, 0, n_seq_max)

    def view(self, seq_id: int = 0, tier: int | None = None) -> KVCacheView:
        if tier is None:
            return KVCacheView(self.ctx, seq_id, n_lists=self.model.n_layer * self.model.n_head_kv)
        return KVCacheView(self.ctx, seq_id, tier, n_lists=len(self.layout.heads(tier)) if self.layout else None)

    def set_tiers(self, layout: "kvgguf.tiers.KVTierLayout | None") -> None:
        """Replace the KV cache by an empty tiered one (None: the plain one again)."""
        if layout is None:
            kvgguf.tiers.clear_tiers(self.ctx)
        else:
            layout.apply(self.ctx)
        self.layout = layout
        self.mem = C.llama_get_memory(self.ctx)

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
_libggml_base.ggml_op_desc.argtypes = [ctypes.c_void_p]
_libggml_base.ggml_op_desc.restype = ctypes.c_char_p


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


def kl_divergence(logits_p: np.ndarray, logits_q: np.ndarray) -> float:
    """KL(softmax(p) || softmax(q))."""
    p = np.exp(logits_p - logits_p.max()); p /= p.sum()
    q = np.exp(logits_q - logits_q.max()); q /= q.sum()
    return float(np.sum(p * (np.log(p + 1e-30) - np.log(q + 1e-30))))


@dataclass
class RandomEviction:
    """Random scores over a sequence's cells (the newest protected), and the cells a top-``n_keep`` drops."""

    scores: np.ndarray
    protect: np.ndarray
    n_keep: int
    removed: np.ndarray   # positions

    @classmethod
    def of(cls, positions: np.ndarray, n_keep: int, seed: int) -> "RandomEviction":
        from kvgguf.scores import select_topk

        scores = np.random.default_rng(seed).random(positions.size).astype(np.float32)
        protect = np.zeros(positions.size, dtype=bool)
        protect[-1] = True
        removed = np.setdiff1d(positions, positions[select_topk(scores, n_keep, protect)])
        return cls(scores, protect, n_keep, removed)

    def remove_upstream(self, memory) -> None:
        """Remove the dropped cells one position at a time with upstream llama_memory_seq_rm."""
        for p in self.removed.tolist():
            C.llama_memory_seq_rm(memory, 0, p, p + 1)


def last_logits(llm) -> np.ndarray:
    """The logits of the last decoded token of a llama_cpp.Llama, as its sampler reads them (``eval_logits``
    holds logits only with logits_all=True)."""
    logits = np.ctypeslib.as_array(C.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    assert np.isfinite(logits).all() and logits.std() > 0
    return logits


class RawHost:
    """A sequence of a RawContext as a scoring context's host (kvgguf.scoring.ScoringHost), for checks that
    need what kvgguf.Llama does not offer (several sequences, adapters set by hand)."""

    offloaded = False

    def __init__(self, raw: RawContext, seq_id: int = 0) -> None:
        self.raw = raw
        self.ctx = raw.ctx
        self.model = raw.model.model
        self.seq_id = seq_id
        self.n_tokens = 0
        self._ids = np.zeros(0, dtype=np.intc)
        self.logits: np.ndarray | None = None

    def token_ids(self) -> np.ndarray:
        return self._ids

    def decode_tokens(self, tokens: list[int]) -> None:
        positions = list(range(self.n_tokens, self.n_tokens + len(tokens)))
        self.logits = self.raw.decode(tokens, positions=positions, seq_ids=(self.seq_id,))
        self._ids = np.concatenate([self._ids[:self.n_tokens], np.asarray(tokens, dtype=np.intc)])
        self.n_tokens += len(tokens)

    def lora_adapters(self) -> list:
        return []

    def grow(self, n_positions: int) -> None:
        if n_positions > self._ids.size:
            self._ids = np.concatenate([self._ids, np.zeros(n_positions - self._ids.size, dtype=np.intc)])

    def last_logits(self) -> np.ndarray:
        """The logits llama.cpp holds now for the last decoded row (what a sampler would read)."""
        logits = C.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.raw.model.n_vocab,)).copy()


def write_lora_adapter(path, model_path: str, targets: tuple[str, ...] = ("attn_q",), rank: int = 4,
                       alpha: float = 8.0, scale: float = 0.05, seed: int = 0, zero_b: bool = False) -> str:
    """A LoRA adapter GGUF for the model at ``model_path`` (gguf-py): random A and B (B zero with ``zero_b``) on
    the ``targets`` projections of every layer, in llama.cpp's adapter layout (A: [in, r], B: [r, out])."""
    import gguf

    reader = gguf.GGUFReader(model_path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_type("adapter")
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for name, shape in shapes.items():
        if not any(name.endswith(f".{target}.weight") for target in targets):
            continue
        n_in, n_out = shape
        a = (rng.standard_normal((rank, n_in)) * scale).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * scale).astype(np.float32)
        if zero_b:
            b[:] = 0.0
        writer.add_tensor(f"{name}.lora_a", a)
        writer.add_tensor(f"{name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def token_embeddings(model_path: str, tokens: list[int]) -> np.ndarray:
    """The model's input embedding rows of ``tokens``, dequantized from the GGUF file with gguf-py."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(model_path)
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rows = dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(rows.reshape(-1, int(tensor.shape[0]))[tokens], dtype=np.float32)


def check_eviction_equals_upstream(model: RawModel, prompt: list[int], removals: list[np.ndarray],
                                   **config) -> tuple[list[float], list[bool]]:
    """For each set of positions in ``removals``: evicting it in one call gives the cache, and the next-token
    logits, of upstream llama.cpp's removal of the same positions (test_eviction_engine's docstring has why):
    bit-identical logits to llama_memory_seq_rm per position (holes), and after compaction the same K/V bytes and
    bit-identical logits as llama.cpp's own state loader placing those cells contiguously. Returns, per set, the
    KL divergence and top-1 agreement between the holey and the compact layout (float summation order only)."""
    n = len(prompt)
    nxt = model.tokenize(" The", add_special=False)[0]
    evicted = RawContext(model, **config)
    holes = RawContext(model, **config)
    reloaded = RawContext(model, **config)
    try:
        evicted.decode(prompt)
        base = evicted.save()
        kls, top1 = [], []
        for removed in removals:
            kept = np.setdiff1d(np.arange(n), removed)
            holes.load(base)
            for p in removed:
                assert C.llama_memory_seq_rm(holes.mem, 0, int(p), int(p) + 1)
            reloaded.load(holes.save())
            ref_state = reloaded.seq_state()
            holes_logits = holes.decode([nxt], positions=[n])
            reloaded_logits = reloaded.decode([nxt], positions=[n])

            evicted.load(base)
            freed = evicted.view().remove(removed)
            assert freed == len(np.unique(removed))
            assert np.array_equal(evicted.view().positions(), kept)   # the cells are really gone
            assert evicted.view().n_attended() == max(256, -(-n // 256) * 256)   # holes: the window stays
            assert np.array_equal(evicted.decode([nxt], positions=[n]), holes_logits)

            evicted.load(base)
            evicted.view().remove(removed)
            assert evicted.view().compact() == 0                     # token-level compaction frees nothing more
            assert evicted.view().n_attended() == max(256, -(-len(kept) // 256) * 256)
            state = evicted.seq_state()
            assert np.array_equal(state.positions, ref_state.positions)
            assert np.array_equal(state.k, ref_state.k) and np.array_equal(state.v, ref_state.v)
            logits = evicted.decode([nxt], positions=[n])
            assert np.array_equal(logits, reloaded_logits), len(removed)

            kls.append(kl_divergence(holes_logits, logits))
            top1.append(bool(logits.argmax() == holes_logits.argmax()))
        return kls, top1
    finally:
        evicted.close()
        holes.close()
        reloaded.close()
