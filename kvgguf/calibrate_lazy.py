"""``kvgguf calibrate-lazy -m model.gguf``: pick LazyEviction's observation window W for a model, the way the paper
does: the window that covers ``--coverage`` (80%) of the maximum recurrence intervals (MRI) measured on the
model's own step-by-step reasoning.

The calibration prompts are grade-school arithmetic word problems generated here from our own templates and seeds
(never the benchmarks' tasks), asked as the reference harness asks: reason step by step, the final answer in
``\\boxed{}``. The model answers greedily (at most ``--max-tokens`` tokens) with ``kv_eviction="lazy"`` and a
budget no answer reaches, so nothing is evicted and the policy's state is the plain measurement: for every cell
and (layer, KV head), its MRI at the end of the answer (``kvgguf/policies/lazy.py``). W is the ``coverage``
quantile of all of them. The result (W, alpha, the MRI quantiles, the command) is written as JSON; in
``kvgguf/lazy_windows/`` it becomes the default ``kv_lazy_window`` / ``kv_lazy_alpha`` of that model file, and of
the other models of its architecture (``general.architecture``: the family's default) that have none of their own.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).with_name("lazy_windows")
SEED0 = 3_000_000  # calibration seeds: apart from the bench's (0...) and train-lookahead's (1e6, 2e6)
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = (
    "A baker bakes {a} loaves of bread every morning for {b} days. She sells {c} loaves in all and gives {d} to a "
    "shelter. How many loaves does she have left?",
    "Mia has {a} marbles. She buys {b} bags with {c} marbles in each bag, then gives {d} marbles to her brother. "
    "How many marbles does Mia have now?",
    "A train travels at {a} km per hour for {b} hours, stops, then travels at {c} km per hour for {d} hours. How "
    "many kilometres does it travel in all?",
    "Pens cost {a} dollars each and notebooks cost {b} dollars each. Tom buys {c} pens and {d} notebooks. How much "
    "does he spend?",
    "A hall has {a} rows of chairs with {b} chairs in each row. {c} people sit down, and then {d} more arrive. How "
    "many chairs are still free?",
    "A farmer has {a} hens. Each hen lays {b} eggs a week. He sells eggs in boxes of {c}. How many full boxes can "
    "he fill in {d} weeks?",
)


def calibration_prompts(n: int, seed0: int = SEED0) -> list[str]:
    """``n`` word problems, each fixed by its seed."""
    prompts = []
    for seed in range(seed0, seed0 + n):
        rng = random.Random(f"lazy-calibration/{seed}")
        template = TEMPLATES[seed % len(TEMPLATES)]
        numbers = {key: rng.randint(2, 40) for key in "abcd"}
        prompts.append(f"{INSTRUCTION}\n{template.format(**numbers)}")
    return prompts


def measure(model: str, n_prompts: int, max_tokens: int, alpha: float, threads: int) -> dict[str, Any]:
    """Every cell's MRI (over its layers and KV heads) after the model's greedy answer to each prompt."""
    from .chat import chat_prompt_tokens, greedy_tokens
    from .llama import Llama

    n_ctx = 512 + max_tokens
    # W = 1: the window plays no part when nothing is evicted (the budget is above any answer)
    llm = Llama(model, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                kv_eviction="lazy", kv_budget=n_ctx - 1, kv_lazy_window=1, kv_lazy_alpha=alpha)
    recurrences, answers = [], []
    try:
        for text in tqdm(calibration_prompts(n_prompts), desc="calibrate-lazy", unit="prompt"):
            prompt = chat_prompt_tokens(llm, [{"role": "user", "content": text}])
            n_answer = sum(1 for _ in itertools.islice(greedy_tokens(llm, prompt), max_tokens))
            if llm.kv_stats()["evictions"]:
                raise RuntimeError("the calibration evicted: its budget must stay above every answer")
            recurrences.append(llm.kv_controller.policy.recurrence.values.ravel().copy())
            answers.append({"prompt_tokens": len(prompt), "answer_tokens": n_answer})
    finally:
        llm.close()
    return {"recurrence": np.concatenate(recurrences), "answers": answers}


def window_for(recurrence: np.ndarray, coverage: float) -> int:
    """The smallest window that covers ``coverage`` of the MRIs (at least 1)."""
    return max(1, int(math.ceil(np.quantile(recurrence, coverage))))


def model_architecture(model_path: str | Path) -> str | None:
    """The GGUF file's ``general.architecture`` (``llama``, ``qwen2``, ...), read with gguf-py; None if absent."""
    from .gguf_py import gguf_module

    gguf = gguf_module()
    field = gguf.GGUFReader(str(model_path)).get_field(gguf.Keys.General.ARCHITECTURE)
    return str(field.contents()) if field is not None else None


def shipped_calibration(model_path: str | Path, family: bool = True) -> dict[str, Any] | None:
    """The calibration shipped for this model file (``kvgguf/lazy_windows/*.json``, matched by the file's
    fingerprint); else, with ``family``, the one shipped for another model of the same architecture (the model
    family's default: the first by file name); else None."""
    from .contexts import file_fingerprint

    if not SHIPPED_DIR.is_dir():
        return None
    fingerprint = file_fingerprint(model_path)
    calibrations = [json.loads(path.read_text()) for path in sorted(SHIPPED_DIR.glob("*.json"))]
    for calibration in calibrations:
        if calibration.get("fingerprint") == fingerprint:
            return calibration
    if not family:
        return None
    architecture = model_architecture(model_path)
    return next((c for c in calibrations if architecture and c.get("architecture") == architecture), None)


def lazy_defaults(kv_eviction: str | None, model_path: str | Path, kv_window: int | None,
                  kv_lazy_window: int | None, kv_lazy_alpha: float | None) -> tuple[int | None, float | None]:
    """kv_lazy_window and kv_lazy_alpha for a policy that tracks recurrence: the caller's, else the model's
    shipped calibration's, else its family's (``shipped_calibration``), else None (the settings' defaults)."""
    from .policies import policy_class

    try:
        policy = policy_class(kv_eviction) if isinstance(kv_eviction, str) else None
    except ValueError:
        policy = None  # validate_settings names it
    window_given = kv_lazy_window is not None or kv_window is not None
    if policy is None or not policy.tracks_recurrence or (window_given and kv_lazy_alpha is not None):
        return kv_lazy_window, kv_lazy_alpha
    calibration = shipped_calibration(model_path)
    if calibration is None:
        return kv_lazy_window, kv_lazy_alpha
    if not window_given:
        kv_lazy_window = int(calibration["window"])
    return kv_lazy_window, (float(calibration["alpha"]) if kv_lazy_alpha is None else kv_lazy_alpha)


def main(args: argparse.Namespace) -> int:
    from .contexts import file_fingerprint
    from .models import resolve_model
    from .settings import validate_settings

    if args.prompts < 1:
        raise ValueError(f"--prompts must be >= 1, got {args.prompts}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if not 0.0 < args.coverage < 1.0:
        raise ValueError(f"--coverage must be in (0, 1), got {args.coverage}")
    validate_settings("lazy", kv_budget=1024, kv_lazy_alpha=args.alpha)  # names a bad alpha
    model = str(resolve_model(args.model))
    start = time.perf_counter()
    measured = measure(model, args.prompts, args.max_tokens, args.alpha, args.threads)
    recurrence = measured["recurrence"]
    window = window_for(recurrence, args.coverage)
    quantiles = {f"{q:.2f}": float(np.quantile(recurrence, q)) for q in (0.5, 0.8, 0.9, 0.95, 0.99)}
    result = {"model": Path(model).name, "fingerprint": file_fingerprint(model),
              "architecture": model_architecture(model), "window": window,
              "alpha": args.alpha, "coverage": args.coverage, "prompts": args.prompts, "max_tokens": args.max_tokens,
              "mri_quantiles": quantiles, "mri_zero_share": float(np.mean(recurrence == 0)),
              "n_values": int(recurrence.size), "answers": measured["answers"],
              "seconds": time.perf_counter() - start, "threads": args.threads,
              "command": " ".join(["kvgguf"] + sys.argv[1:])}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    logger.info("MRI quantiles %s; wrote %s", quantiles, args.output)
    print(f"kv_lazy_window={window} kv_lazy_alpha={args.alpha}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .models import MODEL_HELP
    from .settings import DEFAULT_LAZY_ALPHA

    parser.add_argument("-m", "--model", help=MODEL_HELP)
    parser.add_argument("-o", "--output", required=True, help="the JSON to write (W, alpha, the measurement)")
    parser.add_argument("--prompts", type=int, default=24, help="calibration word problems")
    parser.add_argument("--max-tokens", type=int, default=512, help="the longest answer, in tokens")
    parser.add_argument("--alpha", type=float, default=DEFAULT_LAZY_ALPHA,
                        help="the attention probability that counts as attending a cell")
    parser.add_argument("--coverage", type=float, default=0.8, help="the share of the MRIs the window covers")
    parser.add_argument("--threads", type=int, default=2)
