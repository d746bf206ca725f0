"""``kvgguf profile-heads``: measure a model's head profile (kvgguf.head_profile) with KVzip on calibration prose.

Each calibration context is the standard library's documentation (kvgguf.prose.CALIBRATION_MODULES, never a
benchmark haystack), prefilled as a user turn of the model's chat template and scored by KVzip's reconstruction,
as ``Llama.compress`` does; the scores of its evictable cells (after the template's head, before the protected
window) go into the profile.
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from . import prose
from .head_profile import DEFAULT_RATIOS, HeadProfile, profile_from_scores
from .settings import DEFAULT_WINDOW

logger = logging.getLogger(__name__)

DEFAULT_CONTEXTS = 8
DEFAULT_CONTEXT_TOKENS = 1536


def context_scores(llm, document: str) -> npt.NDArray[np.float32]:
    """KVzip's scores [n_layer, n_head_kv, n_cells] of ``document``'s evictable cells, the document prefilled as
    a user turn (``llm`` evicts with kvzip)."""
    head = llm.chat_template.user_turn_head(None)[1] if llm.chat_template.has_template else []
    body = llm.tokenize(document.encode(), add_bos=not head, special=False)
    tokens = head + body
    if len(tokens) + 1 > llm.n_ctx():
        raise ValueError(f"a calibration context of {len(tokens)} tokens does not fit n_ctx={llm.n_ctx()}")
    llm.prefill(tokens)
    scored = llm.kv_scores()
    if scored is None:
        raise RuntimeError("kvzip did not evict the calibration context (its keep ratio must be < 1)")
    positions, scores = scored["positions"], scored["scores"]
    window = llm.kv_settings.window
    first = len(head) if head else 1  # after the template's head, or after BOS
    evictable = (positions >= first) & (positions < len(tokens) - window)
    llm.reset()
    return np.ascontiguousarray(scores[:, :, evictable])


def measure(model: str, n_contexts: int = DEFAULT_CONTEXTS, context_tokens: int = DEFAULT_CONTEXT_TOKENS,
            ratios: tuple[float, ...] = DEFAULT_RATIOS, n_threads: int = 2) -> HeadProfile:
    """The head profile of ``model`` over ``n_contexts`` calibration contexts of about ``context_tokens`` tokens."""
    from .llama import Llama

    n_ctx = 2 * context_tokens + 1024  # the context plus KVzip's reconstruction room
    llm = Llama(model, n_ctx=n_ctx, n_batch=512, n_threads=n_threads, verbose=False, kv_eviction="kvzip",
                kv_keep=0.5, kv_window=DEFAULT_WINDOW, kv_head_profile=None)  # scores of the plain cache
    try:
        count = lambda text: len(llm.tokenize(text.encode(), add_bos=False, special=False))  # noqa: E731
        documents = prose.documents(prose.CALIBRATION_MODULES, context_tokens, count)
        if len(documents) < n_contexts:
            raise ValueError(f"the calibration prose gives {len(documents)} contexts of {context_tokens} tokens, "
                             f"fewer than the {n_contexts} asked for")
        documents = documents[:n_contexts]
        start = time.perf_counter()
        scores = [context_scores(llm, document) for document in tqdm(documents, desc="calibration contexts")]
        seconds = time.perf_counter() - start
        calibration = {
            "source": "Python standard library documentation (kvgguf.prose.CALIBRATION_MODULES)",
            "modules": list(prose.CALIBRATION_MODULES), "python": platform.python_version(),
            "contexts": n_contexts, "context_tokens": context_tokens,
            "evictable_cells": [int(s.shape[2]) for s in scores], "policy": "kvzip", "seconds": round(seconds, 1),
        }
        return profile_from_scores(scores, ratios, llm.model_identity(), calibration)
    finally:
        llm.close()


def summary(profile: HeadProfile, top: int = 6) -> str:
    """A few lines: the top pairs and their shares, and how concentrated each ratio's budget is."""
    lines = []
    for i, ratio in enumerate(profile.ratios):
        shares = np.sort(profile.shares[i].ravel())[::-1]
        lines.append(f"keep {ratio:.2f}: the top {top} of {profile.n_pairs} (layer, head) pairs take "
                     f"{shares[:top].sum():.0%} of the budget")
    pairs = [divmod(int(pair), profile.n_head_kv) for pair in profile.ranking[:top]]
    lines.append("most important (layer, head): " + ", ".join(f"({layer}, {head})" for layer, head in pairs))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .models import MODEL_HELP

    parser.add_argument("-m", "--model", help=MODEL_HELP)
    parser.add_argument("-o", "--output", type=Path, required=True, help="the profile file to write (GGUF)")
    parser.add_argument("--into-model", type=Path, metavar="GGUF",
                        help="also write a copy of the model with the profile in its metadata")
    parser.add_argument("--contexts", type=int, default=DEFAULT_CONTEXTS, help="calibration contexts")
    parser.add_argument("--context-tokens", type=int, default=DEFAULT_CONTEXT_TOKENS,
                        help="tokens per calibration context")
    parser.add_argument("--ratios", default=",".join(str(r) for r in DEFAULT_RATIOS),
                        help="kept ratios to profile, comma-separated, each in (0, 1)")
    parser.add_argument("-t", "--threads", type=int, default=2)


def main(args: argparse.Namespace) -> int:
    from .models import resolve_model

    try:
        ratios = tuple(float(value) for value in args.ratios.split(","))
    except ValueError:
        raise ValueError(f"--ratios must be comma-separated numbers, got {args.ratios!r}") from None
    if not all(0.0 < ratio < 1.0 for ratio in ratios) or len(set(ratios)) != len(ratios):
        raise ValueError(f"--ratios must be distinct kept ratios in (0, 1), got {args.ratios!r}")
    if args.contexts < 1 or args.context_tokens < 64:
        raise ValueError(f"--contexts must be >= 1 and --context-tokens >= 64, got {args.contexts} and "
                         f"{args.context_tokens}")
    model = str(resolve_model(args.model))
    logger.info("profiling %s (python %s)", model, sys.version.split()[0])
    profile = measure(model, args.contexts, args.context_tokens, ratios, args.threads)
    profile.save(args.output)
    logger.info("wrote %s\n%s", args.output, summary(profile))
    if args.into_model is not None:
        profile.save_into_model(model, args.into_model)
        logger.info("wrote %s (the model with the profile in its metadata)", args.into_model)
    return 0
