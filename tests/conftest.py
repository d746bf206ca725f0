"""Shared fixtures: the real default model, loaded once, through kvgguf's patched llama.cpp."""
from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
