"""Models whose memory is not one attention KV cache: a recurrent one (Mamba, a fixed-size state per sequence) and a
hybrid one (Jamba, Mamba layers beside attention layers in llama.cpp's llama_memory_hybrid). Tiny random checkpoints
made here with transformers and converted with llama.cpp's own converter (`kvgguf convert hf`).

kvgguf.Llama loads and runs them as llama_cpp.Llama does; every eviction setting is refused with a ValueError that
says what the memory is, at load and when reconfiguring, and the model keeps answering afterwards."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import kvgguf
import llama_cpp
from kvgguf.convert import hf
from tiny_models import write_tiny_hf_checkpoint

pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

KINDS = {"mamba": "recurrent (mamba)", "jamba": "hybrid (jamba)"}
GREEDY = {"max_tokens": 6, "temperature": 0.0}


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory-kinds")
    files = {}
    for architecture in KINDS:
        write_tiny_hf_checkpoint(root / architecture, architecture)
        files[architecture] = hf.convert_hf(root / architecture, root / f"{architecture}.gguf", "f32")
    return files


@pytest.mark.parametrize("architecture", sorted(KINDS))
def test_eviction_is_refused_by_what_the_memory_is(architecture, model_files):
    path = str(model_files[architecture])
    plain = kvgguf.Llama(path, n_ctx=256, n_threads=1, verbose=False)
    upstream = llama_cpp.Llama(path, n_ctx=256, n_threads=1, verbose=False)
    try:
        expected = upstream.create_completion("The logging module", **GREEDY)["choices"][0]["text"]
        assert plain.create_completion("The logging module", **GREEDY)["choices"][0]["text"] == expected
        for policy in ("snapkv", "kvzip", "lazy", "streaming"):
            with pytest.raises(ValueError, match=re.escape(f"kv_eviction='{policy}' needs a single attention KV "
                                                           f"cache, and this model's memory is {KINDS[architecture]}")):
                plain.configure_kv_eviction(policy)
            with pytest.raises(ValueError, match=re.escape(f"memory is {KINDS[architecture]}")):
                kvgguf.Llama(path, n_ctx=256, n_threads=1, verbose=False, kv_eviction=policy)
        # refused, the model runs on without eviction, and says it holds no cells to count
        assert plain.create_completion("The logging module", **GREEDY)["choices"][0]["text"] == expected
        stats = plain.kv_stats()
        assert stats["policy"] is None and stats["evictions"] == 0 and stats["cells_now"] is None
    finally:
        upstream.close()
        plain.close()
