"""Training prompts for LookaheadKV modules, generated offline and deterministically from a seed.

A prompt is a chat (a list of messages) whose last turn is the user's; the model's own greedy answer to it is
the training response (``train_lookahead``). The kinds, drawn in turn:

- ``task-aware`` / ``task-agnostic``: the benchmark's task generators (``kvgguf.bench.tasks``) with the question
  in the same turn as the context, or the context alone. Seeds start at ``TRAIN_SEED0`` / ``HELDOUT_SEED0``,
  far above any benchmark's (those count from 0), so no benchmark sample is a training or held-out one.
- ``prose``: a question, summary or extraction instruction over the standard library's documentation prose
  (``kvgguf.prose``, the calibration modules: never the benchmark's prose haystack).
- ``source``: the same over source code and its documentation that ships with Python and the installed
  packages (``inspect.getsource``).
- ``chat``: two turns over a document, the first answered by a fixed short acknowledgement.

Lengths are drawn log-uniformly from ``MIN_TOKENS`` to ``MAX_TOKENS`` tokens of context.
"""
from __future__ import annotations

import importlib
import inspect
import math
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from .bench.tasks import TASKS, generate
from .prose import CALIBRATION_MODULES, paragraphs

MIN_TOKENS = 256
MAX_TOKENS = 2048
TRAIN_SEED0 = 1_000_000
HELDOUT_SEED0 = 2_000_000
KINDS = ("task-aware", "task-agnostic", "prose", "source", "chat")
# modules whose source (and its docstrings and comments) the source prompts read: the standard library's and
# those of packages kvgguf installs with
SOURCE_MODULES = ("json.decoder", "json.encoder", "argparse", "logging.handlers", "csv", "configparser",
                  "textwrap", "difflib", "heapq", "bisect", "fractions", "statistics", "shlex", "tokenize",
                  "ast", "dataclasses", "enum", "calendar", "tqdm.std", "yaml.scanner", "numpy.lib._npyio_impl")

PROSE_INSTRUCTIONS = (
    "Summarize the text above in three sentences.",
    "What is the main topic of the text above? Answer briefly.",
    "List the key terms that the text above defines.",
    "Write a one-paragraph summary of the text above for a beginner.",
    "Which classes or functions does the text above mention? List them.",
    "What does the text above say about {word}?",
    "Quote the sentence of the text above that mentions {word}.",
    "Give three questions that the text above answers, with their answers.",
)
SOURCE_INSTRUCTIONS = (
    "Explain what the code above does.",
    "List the functions and classes defined in the code above.",
    "What does {word} do in the code above?",
    "Find a possible bug or an edge case in the code above and explain it.",
    "Write a docstring for the first function in the code above.",
    "Which modules does the code above import?",
    "Summarize the code above in two sentences.",
)
CHAT_FIRST = ("Read this document carefully; I will ask about it next.", "Here is some text for you to read.")
CHAT_ACK = "I have read it. What would you like to know?"

Counter = Callable[[str], int]


@dataclass(frozen=True)
class Prompt:
    """One training prompt: a chat whose last message is the user's."""

    kind: str
    seed: int
    messages: tuple[dict[str, str], ...]


def seeds(split: str, n: int) -> range:
    """The seeds of a split ("train" or "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return range(TRAIN_SEED0 if split == "train" else HELDOUT_SEED0, (TRAIN_SEED0 if split == "train"
                                                                       else HELDOUT_SEED0) + n)


def make_prompt(seed: int, count: Counter) -> Prompt:
    """The prompt of ``seed``: its kind by turns, its length and content from ``seed``."""
    rng = random.Random(f"lookahead/{seed}")
    kind = KINDS[seed % len(KINDS)]
    n_tokens = int(math.exp(rng.uniform(math.log(MIN_TOKENS), math.log(MAX_TOKENS))))
    if kind in ("task-aware", "task-agnostic"):
        task = rng.choice(sorted(TASKS))
        sample = generate(task, n_tokens, seed, count)
        text = sample.prompt() if kind == "task-aware" else sample.context
        return Prompt(kind, seed, ({"role": "user", "content": text},))
    if kind == "source":
        document = _excerpt(_source_paragraphs(), rng, n_tokens, count, "\n\n")
        instruction = rng.choice(SOURCE_INSTRUCTIONS).format(word=_identifier(rng, document))
        return Prompt(kind, seed, ({"role": "user", "content": f"{document}\n\n{instruction}"},))
    document = _excerpt(tuple(paragraphs(CALIBRATION_MODULES)), rng, n_tokens, count, "\n\n")
    instruction = rng.choice(PROSE_INSTRUCTIONS).format(word=_word(rng, document))
    if kind == "prose":
        return Prompt(kind, seed, ({"role": "user", "content": f"{document}\n\n{instruction}"},))
    return Prompt(kind, seed, ({"role": "user", "content": f"{rng.choice(CHAT_FIRST)}\n\n{document}"},
                               {"role": "assistant", "content": CHAT_ACK},
                               {"role": "user", "content": instruction.replace("the text above", "the document")}))


def _excerpt(pieces: tuple[str, ...], rng: random.Random, n_tokens: int, count: Counter, joiner: str) -> str:
    """Consecutive pieces from a random start, about ``n_tokens`` tokens of them (wrapping around)."""
    start = rng.randrange(len(pieces))
    chosen, total = [], 0
    for i in range(len(pieces)):
        piece = pieces[(start + i) % len(pieces)]
        chosen.append(piece)
        total += count(piece) + 1
        if total >= n_tokens:
            break
    return joiner.join(chosen)


def _word(rng: random.Random, text: str) -> str:
    words = sorted({w for w in re.findall(r"[A-Za-z]{6,}", text)})
    return rng.choice(words) if words else "it"


def _identifier(rng: random.Random, code: str) -> str:
    names = sorted(set(re.findall(r"def ([A-Za-z_][A-Za-z0-9_]{3,})", code)))
    return rng.choice(names) if names else _word(rng, code)


@lru_cache(maxsize=1)
def _source_paragraphs() -> tuple[str, ...]:
    """The source modules' code cut at blank lines between top-level definitions (blocks of at most 60 lines)."""
    blocks: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in SOURCE_MODULES:
            try:
                source = inspect.getsource(importlib.import_module(name))
            except (ImportError, OSError, TypeError):
                continue  # a package this environment does not have
            current: list[str] = []
            for line in source.splitlines():
                if current and (len(current) >= 60 or (line[:1].isalpha() and not current[-1].strip())):
                    blocks.append("\n".join(current).strip("\n"))
                    current = []
                current.append(line)
            if current:
                blocks.append("\n".join(current).strip("\n"))
    return tuple(block for block in blocks if block.strip())
