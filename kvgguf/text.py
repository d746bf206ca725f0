"""Deterministic filler prose for demos, benchmarks and tests (generated here; nothing is downloaded)."""
from __future__ import annotations

import random

FILLER_SENTENCES = (
    "In the old harbour town, the lighthouse keeper wrote every evening about ships, weather and passers-by.",
    "The baker on the corner opened before dawn and sold rye bread, almond cakes and small pies.",
    "Children walked along the pier after school, counting gulls and the fishing boats coming home.",
    "A narrow road climbed the hill past the chapel, the orchard and a row of white stone houses.",
    "On market days farmers brought cheese, apples and wool, and the square filled with voices.",
    "The river bent twice before reaching the sea, and its banks were lined with willows and reeds.",
)


def filler_sentences(n_sentences: int, seed: int = 0) -> list[str]:
    """``n_sentences`` sentences drawn with a seeded generator: the same arguments give the same text."""
    rng = random.Random(seed)
    return [rng.choice(FILLER_SENTENCES) for _ in range(n_sentences)]


def haystack(n_sentences: int, seed: int = 0) -> str:
    return " ".join(filler_sentences(n_sentences, seed))
