"""Natural prose that ships with Python: the paragraphs of the standard library's own documentation strings.

Generated filler (kvgguf.text) repeats a few sentences, so a planted fact stands out of it; real prose is where
query-agnostic eviction has to choose. Calibration (``kvgguf profile-heads``) and the benchmark's prose task draw
from disjoint module lists, so no benchmark haystack is calibration text.
"""
from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Iterator

# the modules whose documentation calibrates head profiles (never a benchmark's haystack)
CALIBRATION_MODULES = ("argparse", "logging", "unittest", "email.message", "http.client", "asyncio.events",
                       "decimal", "tarfile", "zipfile", "configparser", "sqlite3", "xml.dom.minidom",
                       "urllib.request", "socket", "ssl", "csv")
# the modules whose documentation is the benchmark's natural-prose haystack
BENCH_MODULES = ("collections", "functools", "itertools", "pathlib", "json", "datetime", "threading",
                 "subprocess", "re", "typing", "dataclasses", "inspect", "shutil", "random", "string", "textwrap")

_MIN_CHARS = 80
_WORDY = re.compile(r"[A-Za-z ,.;:'()-]")


def _is_prose(paragraph: str) -> bool:
    """A paragraph of sentences: long enough, mostly words, no code, no reST markup or tables."""
    if len(paragraph) < _MIN_CHARS or ">>>" in paragraph or "::" in paragraph or "==" in paragraph:
        return False
    if not paragraph[0].isupper() or not paragraph.endswith("."):
        return False
    return sum(bool(_WORDY.match(char)) for char in paragraph) >= 0.9 * len(paragraph)


def _docstrings(module_name: str) -> Iterator[str]:
    """The module's docstring, then those of its public classes, functions and methods, in name order."""
    module = importlib.import_module(module_name)
    yield inspect.getdoc(module) or ""
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        yield inspect.getdoc(member) or ""
        if inspect.isclass(member):
            for attribute_name, attribute in sorted(vars(member).items()):
                if not attribute_name.startswith("_") and callable(attribute):
                    yield inspect.getdoc(attribute) or ""


def paragraphs(module_names: tuple[str, ...]) -> list[str]:
    """Every prose paragraph of the modules' documentation, each once, in module and name order."""
    seen: set[str] = set()
    found = []
    with warnings.catch_warnings():  # reading deprecated members (typing.io, ...) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        docstrings = [docstring for module_name in module_names for docstring in _docstrings(module_name)]
    for docstring in docstrings:
        for block in re.split(r"\n\s*\n", docstring):
            paragraph = " ".join(line.strip() for line in block.splitlines()).strip()
            if paragraph not in seen and _is_prose(paragraph):
                seen.add(paragraph)
                found.append(paragraph)
    return found


def documents(module_names: tuple[str, ...], n_tokens: int, count: Callable[[str], int]) -> list[str]:
    """The modules' prose cut into consecutive documents of about ``n_tokens`` tokens (as ``count`` counts
    them), whole paragraphs each; the last, shorter one is dropped."""
    docs, current, current_tokens = [], [], 0
    for paragraph in paragraphs(module_names):
        current.append(paragraph)
        current_tokens += count(paragraph) + 1
        if current_tokens >= n_tokens:
            docs.append("\n\n".join(current))
            current, current_tokens = [], 0
    return docs
