"""Long-context tasks in the spirit of RULER, generated offline and deterministically.

Every sample is a document (filler prose with facts planted in it) and a question whose answers are strings
that must appear in the model's output. The same (task, length, seed) always gives the same sample, so every
policy and kept ratio is measured on identical prompts.

Tasks:
- ``niah_single``: one "special magic number" for a key; asked for that number.
- ``niah_multikey``: several keys with their numbers; asked for one key's number.
- ``niah_multivalue``: one key with several numbers; asked for all of them (score: the fraction found).
- ``variable_tracking``: a chain of assignments ``VAR B = VAR A`` from one value; asked for every variable
  that holds the value (score: the fraction found).
- ``common_words``: a word list where a few words repeat far more often than the rest; asked for the most
  frequent ones (score: the fraction found).
- ``fact_qa``: one personal fact stated once ("Mira's favourite fruit is the mango."); asked about it.
- ``prose_fact`` / ``prose_niah``: ``fact_qa``'s fact / ``niah_single``'s number in natural prose instead of the
  filler: consecutive paragraphs of the standard library's documentation (kvgguf.prose.BENCH_MODULES, disjoint
  from the head profiles' calibration text), from a seeded paragraph on. Every token of real prose competes for
  the cache, where the filler's repeated sentences are cheap to drop. The text is the running Python's own
  documentation, so results name the Python version.
"""
from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from .. import prose
from ..text import FILLER_SENTENCES

TokenCounter = Callable[[str], int]
# a task: (rng, context tokens, token counter) -> (context, question, answers)
Task = Callable[[random.Random, int, TokenCounter], tuple[str, str, tuple[str, ...]]]
# a haystack: (rng, needles, context tokens, token counter) -> the context with the needles in it
Filler = Callable[[random.Random, list[str], int, TokenCounter], str]

KEYS = ("amber-harbor", "silent-orchard", "copper-lantern", "misty-valley", "northern-bridge", "velvet-river",
        "granite-tower", "hollow-pine", "scarlet-meadow", "frozen-lake", "golden-mill", "quiet-forge")
NAMES = ("Mira", "Tomas", "Elena", "Jonah", "Priya", "Oskar", "Lena", "Rafael", "Ines", "Viktor")
FACTS = (
    ("favourite fruit is the", ("mango", "apricot", "plum", "cherry", "lychee", "quince")),
    ("boat is called the", ("Albatross", "Marigold", "Sea Swift", "Northwind", "Kestrel", "Bluebell")),
    ("sister lives in", ("Lisbon", "Tallinn", "Valencia", "Bergen", "Krakow", "Porto")),
)
WORDS = ("apple", "river", "stone", "cloud", "garden", "window", "candle", "forest", "button", "mirror",
         "ladder", "pocket", "harbor", "violin", "marble", "feather", "lantern", "bridge", "pepper", "saddle",
         "meadow", "anchor", "basket", "cotton", "dragon", "engine", "falcon", "glacier", "hammer", "island")


_FACT_QUESTIONS = {"favourite fruit is the": "What is {name}'s favourite fruit?",
                   "boat is called the": "What is {name}'s boat called?",
                   "sister lives in": "Where does {name}'s sister live?"}


@dataclass(frozen=True)
class Sample:
    """One generated task instance."""

    task: str
    seed: int
    n_tokens_target: int
    context: str
    question: str
    answers: tuple[str, ...]

    def prompt(self) -> str:
        """Context and question in one user message (the query-aware setting)."""
        return f"{self.context}\n\n{self.question}"


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _fill(rng: random.Random, needles: list[str], n_tokens: int, count: TokenCounter) -> str:
    """Filler prose of about n_tokens tokens with the needles at random depths (in the given order)."""
    needle_tokens = sum(count(needle) for needle in needles)
    per_sentence = max(1, count(" ".join(FILLER_SENTENCES)) // len(FILLER_SENTENCES))
    n_filler = max(len(needles) + 1, (n_tokens - needle_tokens) // per_sentence)
    sentences = [rng.choice(FILLER_SENTENCES) for _ in range(n_filler)]
    slots = sorted(rng.sample(range(n_filler + 1), len(needles)))
    for offset, (slot, needle) in enumerate(zip(slots, needles, strict=True)):
        sentences.insert(slot + offset, needle)
    return " ".join(sentences)


@functools.lru_cache(maxsize=1)
def _prose_paragraphs() -> tuple[str, ...]:
    return tuple(prose.paragraphs(prose.BENCH_MODULES))


def _fill_prose(rng: random.Random, needles: list[str], n_tokens: int, count: TokenCounter) -> str:
    """About n_tokens tokens of consecutive documentation paragraphs from a random one on (wrapping around), each
    needle appended to a random paragraph (in the given order)."""
    paragraphs = _prose_paragraphs()
    budget = n_tokens - sum(count(needle) for needle in needles)
    chosen: list[str] = []
    start, used = rng.randrange(len(paragraphs)), 0
    while used < budget and len(chosen) < len(paragraphs):
        paragraph = paragraphs[(start + len(chosen)) % len(paragraphs)]
        n_paragraph = count(paragraph) + 1
        if used + n_paragraph > budget:  # the last paragraph: its first sentences that fit
            sentences = re.split(r"(?<=\.) ", paragraph)
            while len(sentences) > 1 and used + count(" ".join(sentences)) + 1 > budget:
                sentences.pop()
            if chosen and used + count(sentences[0]) + 1 > budget:
                break
            paragraph = " ".join(sentences)
            n_paragraph = count(paragraph) + 1
        chosen.append(paragraph)
        used += n_paragraph
    slots = sorted(rng.choices(range(len(chosen)), k=len(needles)))
    for slot, needle in zip(slots, needles, strict=True):
        chosen[slot] = f"{chosen[slot]} {needle}"
    return "\n\n".join(chosen)


def _magic_number(fill: Filler) -> Task:
    """niah_single in the haystack of ``fill``: one special magic number for a key, asked for."""
    def task(rng: random.Random, n_tokens: int, count: TokenCounter) -> tuple[str, str, tuple[str, ...]]:
        key, value = rng.choice(KEYS), _number(rng)
        context = fill(rng, [f"The special magic number for {key} is {value}."], n_tokens, count)
        return context, f"What is the special magic number for {key}? Answer with the number.", (value,)
    return task


def _niah_multikey(rng: random.Random, n_tokens: int, count: TokenCounter) -> tuple[str, str, tuple[str, ...]]:
    keys = rng.sample(KEYS, 4)
    values = [_number(rng) for _ in keys]
    needles = [f"The special magic number for {k} is {v}." for k, v in zip(keys, values, strict=True)]
    asked = rng.randrange(len(keys))
    context = _fill(rng, needles, n_tokens, count)
    return context, f"What is the special magic number for {keys[asked]}? Answer with the number.", (values[asked],)


def _niah_multivalue(rng: random.Random, n_tokens: int, count: TokenCounter) -> tuple[str, str, tuple[str, ...]]:
    key = rng.choice(KEYS)
    values = [_number(rng) for _ in range(3)]
    needles = [f"One of the special magic numbers for {key} is {v}." for v in values]
    context = _fill(rng, needles, n_tokens, count)
    return context, f"What are all the special magic numbers for {key}? List the numbers.", tuple(values)


def _variable_tracking(rng: random.Random, n_tokens: int, count: TokenCounter) -> tuple[str, str, tuple[str, ...]]:
    value = str(rng.randint(10_000, 99_999))
    names = rng.sample([f"{a}{b}" for a in "ABCDEFGHJKLMNPQRSTUVWXYZ" for b in "QRSTUVWXYZ"], 4)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 4)]
    context = _fill(rng, needles, n_tokens, count)
    question = f"Find all variables that are assigned the value {value}. List their names."
    return context, question, tuple(names)


def _common_words(rng: random.Random, n_tokens: int, count: TokenCounter) -> tuple[str, str, tuple[str, ...]]:
    frequent = rng.sample(WORDS, 3)
    rare = [w for w in WORDS if w not in frequent]
    def listing_tokens(n: int) -> int:  # numbered entries grow with the number of digits: measure, then scale
        return count(" ".join(f"{i + 1}. {WORDS[i % len(WORDS)]}" for i in range(n)))

    n_words = max(60, n_tokens // 4)
    for _ in range(2):
        n_words = max(60, int(n_words * n_tokens / listing_tokens(n_words)))
    words = [rng.choice(rare) for _ in range(n_words)]
    for i in rng.sample(range(n_words), k=min(n_words, n_words // 4)):
        words[i] = frequent[i % 3]
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    context = f"Below is a numbered list of words. {listing}"
    return context, "What are the 3 most common words in the list above? Answer with the words.", tuple(frequent)


def _personal_fact(fill: Filler) -> Task:
    """fact_qa in the haystack of ``fill``: one personal fact stated once, asked about."""
    def task(rng: random.Random, n_tokens: int, count: TokenCounter) -> tuple[str, str, tuple[str, ...]]:
        name = rng.choice(NAMES)
        relation, options = rng.choice(FACTS)
        value = rng.choice(options)
        context = fill(rng, [f"{name}'s {relation} {value}."], n_tokens, count)
        return context, _FACT_QUESTIONS[relation].format(name=name) + " Answer in a few words.", (value,)
    return task


TASKS: dict[str, Task] = {
    "niah_single": _magic_number(_fill),
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "fact_qa": _personal_fact(_fill),
    "prose_fact": _personal_fact(_fill_prose),
    "prose_niah": _magic_number(_fill_prose),
}


def generate(task: str, n_tokens: int, seed: int, count_tokens: TokenCounter) -> Sample:
    """The sample of ``task`` with a context of about ``n_tokens`` tokens, fixed by ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if n_tokens < 64:
        raise ValueError(f"n_tokens must be >= 64, got {n_tokens}")
    rng = random.Random(f"{task}/{n_tokens}/{seed}")
    context, question, answers = TASKS[task](rng, n_tokens, count_tokens)
    return Sample(task=task, seed=seed, n_tokens_target=n_tokens, context=context, question=question,
                  answers=answers)


def _normalize(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()


def score(sample: Sample, output: str) -> float:
    """Fraction of the expected answers found in ``output`` (case, punctuation and spacing ignored; a number
    must appear whole, not inside a longer number)."""
    haystack = f" {_normalize(output)} "
    found = sum(f" {_normalize(answer)} " in haystack for answer in sample.answers)
    return found / len(sample.answers)
