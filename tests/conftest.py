"""Shared fixtures: the real default model, loaded once, through kvgguf's patched llama.cpp."""
from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's test command): one core per worker. OpenMP hands ggml (and torch) one thread
    # whatever n_threads a test asks for, and ggml computes with the threads it got, so the results are the same;
    # two workers with two threads each would wake each other's threads at every graph (llama.cpp's CPU decode
    # slows several-fold when another process holds a core). Read by libgomp when it loads, so before kvgguf.
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers reads the GGUF file from disk, never from a hub

import kvgguf  # noqa: E402  (before llama_cpp)
from kvtest import RawModel  # noqa: E402

logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(kvgguf.default_model_path())


@pytest.fixture(scope="session")
def raw_model(model_path: str):
    model = RawModel(model_path)
    yield model
    model.close()


@pytest.fixture(scope="module")
def llm_4k(model_path: str):
    """A kvgguf.Llama with 4096 cells, one per test module (the modules configure it differently); without the
    shipped head profile, so that KVzip evicts in the plain cache (tests/test_tiered_llama.py: with it)."""
    model = kvgguf.Llama(model_path, n_ctx=4096, n_batch=512, n_threads=2, verbose=False, kv_head_profile=None)
    yield model
    model.close()
