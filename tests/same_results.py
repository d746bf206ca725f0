"""What the eviction paths produce on fixed prompts, as digests: recorded once before a refactoring, compared after.

``python tests/same_results.py record`` writes tests/data/same_results.json from the installed kvgguf;
tests/test_same_results.py computes the same digests and asks for bit-identical results (same host features).
Only public API is used (``Llama``, ``prefill``, ``generate``, ``kv_scores``, ``kv_positions``, ``kv_snapshot``,
``compress``, ``CompressedContext.save`` / ``load_context``), so the recorder runs on the code before a change
and the test on the code after it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import kvgguf  # noqa: E402  (before llama_cpp)
from kvgguf import Llama  # noqa: E402
from kvgguf._native import llama_cpp  # noqa: E402
from kvgguf.text import filler_sentences  # noqa: E402

RESULTS_FILE = Path(__file__).with_name("data") / "same_results.json"
FACTS = ("The special magic number for Lisbon is 7315.", "Mira's favourite fruit is the mango.",
         "The blue car belongs to Doctor Okafor.")
GREEDY = dict(temperature=0.0, top_k=1, repeat_penalty=1.0)
PLAIN = dict(kv_head_profile=None)  # the digests were recorded with the plain cache (before the shipped profile)


def digest(value: Any) -> Any:
    """An array as its dtype, shape, SHA-256 and float64 sum (the sum only says how far a mismatch is)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    array = np.ascontiguousarray(value)
    return {"dtype": str(array.dtype), "shape": list(array.shape),
            "sha256": hashlib.sha256(array.tobytes()).hexdigest(), "sum": float(array.astype(np.float64).sum())}


def document(n_sentences: int, seed: int) -> str:
    sentences = filler_sentences(n_sentences, seed=seed)
    for fraction, fact in zip((0.14, 0.5, 0.82), FACTS):
        sentences.insert(int(fraction * n_sentences), fact)
    return " ".join(sentences)


def cache_digest(llm: Llama) -> dict[str, Any]:
    """The last eviction's scores and what the cache holds now (positions, per-head tokens, llama.cpp state)."""
    scores = llm.kv_scores()
    snapshot = llm.kv_snapshot()
    history = [{key: entry[key] for key in ("cells_before", "cells_after", "freed", "granularity")}
               for entry in llm.kv_stats()["history"]]
    return {"scores": None if scores is None else {key: digest(value) for key, value in sorted(scores.items())},
            "positions": digest(llm.kv_positions()), "head_positions": digest(snapshot.head_positions),
            "state": digest(snapshot.data), "tokens": digest(snapshot.tokens), "history": history}


def split_chat_prompt(llm: Llama, text: str, question: str) -> tuple[list[int], list[int]]:
    """A user turn of ``text`` and ``question`` in the chat template, tokenized in two parts after ``text``."""
    prompt = llm.chat_formatter()(messages=[{"role": "user", "content": f"{text}\n\n{question}"}]).prompt
    end = prompt.index(text) + len(text)
    return (llm.tokenize(prompt[:end].encode(), add_bos=False, special=True),
            llm.tokenize(prompt[end:].encode(), add_bos=False, special=True))


def prefill_case(model: str, policy: str, granularity: str | None, n_ctx: int, n_sentences: int,
                 keep: float = 0.2) -> dict[str, Any]:
    """A chat-formatted context prefilled with eviction (chunked when longer than n_ctx), then 16 greedy tokens
    of the answer to a question that the eviction never saw."""
    llm = Llama(model, n_ctx=n_ctx, n_batch=512, n_threads=2, verbose=False, kv_eviction=policy, kv_keep=keep,
                kv_granularity=granularity, **PLAIN)
    try:
        context, question = split_chat_prompt(llm, document(n_sentences, seed=5),
                                              "What is the special magic number for Lisbon?")
        llm.prefill(context)
        result = {"n_context": len(context), "after_prefill": cache_digest(llm)}
        out = []
        for token in llm.generate(question, reset=False, temp=0.0, top_k=1, repeat_penalty=1.0):
            out.append(token)
            if len(out) == 16:
                break
        result["answer_tokens"] = out
        result["answer"] = llm.detokenize(out).decode(errors="replace")
        result["after_answer"] = cache_digest(llm)
        return result
    finally:
        llm.close()


def completion_case(model: str, policy: str, n_ctx: int, n_sentences: int, max_tokens: int) -> dict[str, Any]:
    """create_completion with eviction after the prompt, and generation (end of text suppressed) that fills the
    cache again, so that decode-time evictions follow."""
    llm = Llama(model, n_ctx=n_ctx, n_batch=512, n_threads=2, verbose=False, kv_eviction=policy, kv_keep=0.3,
                **PLAIN)
    try:
        text = document(n_sentences, seed=9) + "\n\nRetell the story above in many words, sentence by sentence."
        prompt = llm.chat_formatter()(messages=[{"role": "user", "content": text}]).prompt
        out = llm.create_completion(prompt, max_tokens=max_tokens, logit_bias={llm.token_eos(): -1e9}, **GREEDY)
        return {"text": out["choices"][0]["text"], "usage": out["usage"], "cache": cache_digest(llm)}
    finally:
        llm.close()


def context_case(model: str, n_ctx: int, n_sentences: int, granularity: str) -> dict[str, Any]:
    """compress() of a document (piece by piece when longer than n_ctx), saved to a file and read back, and one
    greedy answer from it."""
    llm = Llama(model, n_ctx=n_ctx, n_batch=512, n_threads=2, verbose=False, **PLAIN)
    try:
        compressed = llm.compress(document(n_sentences, seed=3), keep=0.2, granularity=granularity,
                                  system="Answer briefly.")
        with tempfile.TemporaryDirectory() as tmp:
            loaded = llm.load_context(compressed.save(Path(tmp) / "doc.kvc"))
        arrays = {name: digest(getattr(loaded, name)) for name in ("state", "tokens", "positions", "head_positions",
                                                                   "scores")}
        same = {name: digest(getattr(compressed, name)) == arrays[name] for name in arrays}
        answer = llm.ask(loaded, "What is Mira's favourite fruit?", max_tokens=12, **GREEDY)
        return {"arrays": arrays, "file_equals_memory": same, "n_protected": loaded.n_protected, "answer": answer}
    finally:
        llm.close()


CASES: dict[str, Callable[[str], dict[str, Any]]] = {
    "snapkv_head": lambda m: prefill_case(m, "snapkv", None, 2048, 60),
    "snapkv_token": lambda m: prefill_case(m, "snapkv", "token", 2048, 60),
    "streaming": lambda m: prefill_case(m, "streaming", None, 2048, 60),
    "kvzip_head": lambda m: prefill_case(m, "kvzip", "head", 2048, 60),
    "kvzip_token": lambda m: prefill_case(m, "kvzip", None, 2048, 60),
    "kvzip_chunked_head": lambda m: prefill_case(m, "kvzip", "head", 512, 70),
    "snapkv_chunked": lambda m: prefill_case(m, "snapkv", None, 512, 70),
    "streaming_decode_fills_cache": lambda m: completion_case(m, "streaming", 256, 8, 300),
    "snapkv_decode_fills_cache": lambda m: completion_case(m, "snapkv", 256, 8, 300),
    "kvzip_decode_fills_cache": lambda m: completion_case(m, "kvzip", 512, 8, 500),
    "context_file_head": lambda m: context_case(m, 4096, 60, "head"),
    "context_file_chunked_token": lambda m: context_case(m, 1024, 130, "token"),
}


def host_features() -> list[str]:
    """The CPU features ggml reports (AVX2, AVX512, ...): results are bit-identical only between equal ones."""
    info = llama_cpp.llama_print_system_info().decode()
    return sorted(part.strip() for part in info.replace("|", "\n").splitlines() if "= 1" in part)


def collect(model: str, names: list[str] | None = None) -> dict[str, Any]:
    return {name: CASES[name](model) for name in (names or list(CASES))}


def main() -> int:
    if sys.argv[1:] != ["record"]:
        print(__doc__)
        return 2
    model = str(kvgguf.default_model_path())
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    results = {"host_features": host_features(), "cases": collect(model)}
    RESULTS_FILE.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
