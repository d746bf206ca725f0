"""Shared fixtures: the real default model, loaded once, through kvgguf's patched llama.cpp."""
from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import kvgguf  # noqa: E402  (before llama_cpp)
from kvtest import RawModel  # noqa: E402

logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

HAYSTACK_SENTENCES = [
    "In the old harbour town, the lighthouse keeper wrote every evening about ships, weather and passers-by.",
    "The baker on the corner opened before dawn and sold rye bread, almond cakes and small pies.",
    "Children walked along the pier after school, counting gulls and the fishing boats coming home.",
    "A narrow road climbed the hill past the chapel, the orchard and a row of white stone houses.",
    "On market days farmers brought cheese, apples and wool, and the square filled with voices.",
    "The river bent twice before reaching the sea, and its banks were lined with willows and reeds.",
]


def haystack(n_sentences: int, seed: int = 0) -> str:
    """Deterministic filler prose."""
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(HAYSTACK_SENTENCES) for _ in range(n_sentences))


@pytest.fixture(scope="session")
def model_path() -> str:
    return str(kvgguf.default_model_path())


@pytest.fixture(scope="session")
def raw_model(model_path: str):
    model = RawModel(model_path)
    yield model
    model.close()
