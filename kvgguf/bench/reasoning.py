"""``kvgguf bench reasoning``: long answers in a bounded cache. Decode-time policies (LazyEviction, H2O, TOVA,
StreamingLLM) evict the model's own step-by-step reasoning while it writes it, and the final answers are scored.

Tasks are grade-school math word problems and arithmetic generated offline and deterministically by reasoning-gym
(``gsm_symbolic``, ``basic_arithmetic``, ...; the bench extra installs it), problem ``i`` of a task being entry
``i`` of ``reasoning_gym.create_dataset(task, seed=DATASET_SEED)``. The model is asked as LazyEviction's reference
harness asks ("reason step by step, ... \\boxed{}", ``kvgguf.calibrate_lazy.INSTRUCTION``, whose own prompts are
other problems), answers greedily up to ``--max-tokens``, and its answer (the last ``\\boxed{}``, else the last
number) is scored by the generator's own ``score_answer`` (full credit: right; its partial credit for a wrong
number in the right form: wrong).

Per problem the full cache answers first; its answer length L sets the budgets: ``kv_budget = prompt +
ceil(budget * L)`` cells for budget 0.25 / 0.5 / 0.75. The prompt is kept at prefill (the reference harness does
not compress it) and every cell is evictable while decoding. Every policy gets the same recent window W (the
model's LazyEviction window, ``kv_lazy_window``: shipped calibration or ``--window``; ``h2o:half`` instead keeps
half the budget recent, as the H2O paper splits it) and sinks; LazyEviction
evicts every W tokens (the cache grows to at most budget + W), the others every token (StreamingLLM through
``kv_evict_every=1``). Per policy x budget: accuracy with a paired bootstrap interval against the full cache,
greedy-token agreement with the full cache's answer (position by position over its first ``--agreement-tokens``),
peak cells, and decode tokens per second against the full cache's on the same problem.

Rows are appended to ``<output>/reasoning.rows.jsonl`` as they are made, so an interrupted run resumes, and two
runs over disjoint ``--first-seed`` / ``--samples`` ranges (one thread each) can share it; the report covers the
problems of the command's range.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..calibrate_lazy import INSTRUCTION
from ..chat import chat_prompt_tokens, greedy_tokens
from ..llama import Llama
from ..models import resolve_model
from ..policies import POLICIES
from ..settings import DEFAULT_SINK
from . import report
from .accuracy import paired, paired_table

logger = logging.getLogger(__name__)

DATASET_SEED = 20_251_207  # reasoning-gym's seed for every task; problem i is the dataset's entry i
FULL = "full"
HALF = "half"  # "h2o:half": the recent window is half the budget, as the H2O paper splits it (recent : heavy = 1 : 1)
DECODE_TIME_POLICIES = ("lazy", "h2o", "tova", "streaming")
REASONING_GYM_MISSING = "kvgguf bench reasoning generates its problems with reasoning-gym: pip install 'kvgguf[bench]'"
_BOXED = "\\boxed{"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer of a step-by-step solution: the content of the last ``\\boxed{...}`` (braces balanced),
    else the last number in the text (thousands separators dropped), else None."""
    start = text.rfind(_BOXED)
    if start >= 0:
        depth, i = 1, start + len(_BOXED)
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def load_problems(tasks: list[str], first: int, samples: int) -> list[dict[str, Any]]:
    """Problems ``first .. first + samples - 1`` of each task: question, answer and the dataset to score with."""
    try:
        import reasoning_gym
    except ImportError:
        raise ValueError(REASONING_GYM_MISSING) from None
    problems = []
    for task in tasks:
        try:
            dataset = reasoning_gym.create_dataset(task, seed=DATASET_SEED, size=first + samples)
        except (KeyError, ValueError) as error:
            raise ValueError(f"--tasks: {task!r} is not a reasoning-gym dataset ({error})") from None
        for index in range(first, first + samples):
            entry = dataset[index]
            problems.append({"task": task, "seed": index, "question": entry["question"], "answer": entry["answer"],
                             "entry": entry, "dataset": dataset})
    return problems


def answer(llm: Llama, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """The model's greedy answer to ``prompt`` (at most ``max_tokens`` tokens, to its end-of-generation token):
    its tokens, the most cells the cache held, and the decode speed (tokens after the first, over their time)."""
    cache = llm.kv_controller.engine.cache
    tokens: list[int] = []
    peak = 0
    first_at = last_at = time.perf_counter()
    for token in itertools.islice(greedy_tokens(llm, prompt), max_tokens):
        last_at = time.perf_counter()
        if not tokens:
            first_at = last_at
        peak = max(peak, cache.n_cells())
        tokens.append(token)
    decode_s = last_at - first_at
    return {"tokens": tokens, "peak_cells": max(peak, cache.n_cells()),
            "decode_tok_s": ((len(tokens) - 1) / decode_s) if decode_s > 0 else None}


def agreement(ours: list[int], full: list[int], n: int) -> float:
    """The share of the full cache's first ``n`` answer tokens that ``ours`` repeats at the same position."""
    reference = full[:n]
    if not reference:
        return 1.0
    same = sum(1 for a, b in zip(ours, reference) if a == b)
    return same / len(reference)


def budget_cells(n_prompt: int, full_answer: int, budget: float) -> int:
    """kv_budget for a budget fraction: the prompt plus that share of the full cache's answer length."""
    return n_prompt + max(1, math.ceil(budget * full_answer))


def _row_key(row: dict[str, Any]) -> tuple[str, int, str, float]:
    return row["task"], row["seed"], row["policy"], row["budget"]


def _load_rows(path: Path) -> dict[tuple[str, int, str, float], dict[str, Any]]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[_row_key(row)] = row
    return rows


def _append_row(path: Path, row: dict[str, Any]) -> None:
    # one write() of one line with O_APPEND: two runs sharing the file never interleave their rows
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


def run(llm: Llama, problems: list[dict[str, Any]], policies: list[str], budgets: list[float], window: int,
        max_tokens: int, agreement_tokens: int, rows_path: Path) -> list[dict[str, Any]]:
    """Every problem with the full cache, then with each policy at each budget; resumes from ``rows_path``."""
    done = _load_rows(rows_path)
    progress = tqdm(total=len(problems) * (1 + len(policies) * len(budgets)), desc="bench reasoning", unit="answer")
    rows = []
    try:
        for problem in problems:
            text = f"{INSTRUCTION}\n{problem['question']}"
            prompt = chat_prompt_tokens(llm, [{"role": "user", "content": text}])
            base = {"task": problem["task"], "seed": problem["seed"], "expected": problem["answer"],
                    "prompt_tokens": len(prompt)}
            full = None
            for policy, budget in [(FULL, 1.0)] + [(p, b) for p in policies for b in budgets]:
                key = (problem["task"], problem["seed"], policy, budget)
                if key in done:
                    row = done[key]
                else:
                    row = measure_one(llm, prompt, policy, budget, window, max_tokens, agreement_tokens, full)
                    row = {**base, **row}
                    row["extracted"] = extract_answer(row["output"])
                    # reasoning-gym gives partial credit to a wrong answer in the right form (0.01 in gsm_symbolic):
                    # an answer is right or wrong here
                    row["raw_score"] = float(problem["dataset"].score_answer(row["extracted"], problem["entry"]))
                    row["score"] = 1.0 if row["raw_score"] >= 1.0 else 0.0
                    _append_row(rows_path, row)
                if policy == FULL:
                    full = row
                rows.append(row)
                progress.update()
    finally:
        progress.close()
    return rows


def measure_one(llm: Llama, prompt: list[int], policy: str, budget: float, window: int, max_tokens: int,
                agreement_tokens: int, full: dict[str, Any] | None) -> dict[str, Any]:
    """One answer under ``policy`` at ``budget`` (the full cache: FULL, 1.0)."""
    if policy == FULL:
        llm.configure_kv_eviction(None)
        kv_budget = None
    else:
        assert full is not None
        kv_budget = budget_cells(len(prompt), len(full["tokens"]), budget)
        name, _, variant = policy.partition(":")
        if variant == HALF:  # the budget beyond the sinks split evenly: recent cells and scored ones
            window = max(1, (kv_budget - DEFAULT_SINK - 1) // 2)
        every = {"kv_lazy_window": window} if POLICIES[name].tracks_recurrence else \
            {"kv_window": window, "kv_evict_every": 1}
        llm.configure_kv_eviction(name, kv_budget=kv_budget, kv_head_profile=None, **every)
    evictions_before = llm.kv_stats()["evictions"]  # kv_stats counts over the model's life
    result = answer(llm, prompt, max_tokens)
    tokens = result["tokens"]
    row = {"policy": policy, "budget": budget, "kv_budget": kv_budget, "window": window if kv_budget else None,
           "tokens": tokens, "answer_tokens": len(tokens), "output": llm.detokenize(tokens).decode(errors="replace"),
           "peak_cells": result["peak_cells"], "decode_tok_s": result["decode_tok_s"],
           "evictions": llm.kv_stats()["evictions"] - evictions_before}
    if full is not None:
        row["agreement"] = agreement(tokens, full["tokens"], agreement_tokens)
        row["decode_vs_full"] = (result["decode_tok_s"] / full["decode_tok_s"]
                                 if result["decode_tok_s"] and full["decode_tok_s"] else None)
    return row


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per policy x budget over all problems: accuracy, agreement, peak cells (and against the full cache's),
    decode speed against the full cache's (median of the per-problem ratios)."""
    full = {(r["task"], r["seed"]): r for r in rows if r["policy"] == FULL}
    out = []
    configs = dict.fromkeys((r["policy"], r["budget"]) for r in rows)
    for policy, budget in configs:
        part = [r for r in rows if (r["policy"], r["budget"]) == (policy, budget)]
        ratios = [r["decode_vs_full"] for r in part if r.get("decode_vs_full")]
        peaks_vs_full = [r["peak_cells"] / full[(r["task"], r["seed"])]["peak_cells"] for r in part]
        out.append({"policy": policy, "budget": budget, "n": len(part),
                    "accuracy": float(np.mean([r["score"] for r in part])),
                    "agreement": float(np.mean([r["agreement"] for r in part])) if policy != FULL else 1.0,
                    "answer_tokens": float(np.mean([r["answer_tokens"] for r in part])),
                    "peak_cells": float(np.mean([r["peak_cells"] for r in part])),
                    "peak_cells_vs_full": float(np.mean(peaks_vs_full)),
                    "peak_above_budget": max((r["peak_cells"] - r["kv_budget"] for r in part if r["kv_budget"]),
                                             default=None),
                    "decode_tok_s": float(np.median([r["decode_tok_s"] for r in part if r["decode_tok_s"]])),
                    "decode_vs_full": float(np.median(ratios)) if ratios else None})
    return out


def paired_with_full(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each policy x budget against the full cache on the same problems (``accuracy.paired``'s interval)."""
    as_accuracy = [{"setting": "reasoning", "policy": r["policy"], "keep": r["budget"], "task": r["task"],
                    "length": 0, "seed": r["seed"], "score": r["score"]} for r in rows]
    budgets = sorted({r["budget"] for r in rows if r["policy"] != FULL})
    # the full cache's scores under each budget, so that accuracy.paired pairs them problem by problem
    as_accuracy += [{**r, "policy": FULL, "keep": b} for r in as_accuracy if r["policy"] == FULL for b in budgets]
    return [{**{k: v for k, v in p.items() if k not in ("setting", "keep")}, "budget": p["keep"]}
            for p in paired(as_accuracy, lambda policy: FULL) if p["policy"] != FULL]


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    summary = results["summary"]
    full = next(s for s in summary if s["policy"] == FULL)
    lines = ["# kvgguf bench reasoning", "",
             f"`{env['command']}` — commit `{env['commit']}`, {env['cpu']}, {env['threads']} threads, "
             f"OMP_WAIT_POLICY={env['omp_wait_policy']}.", "",
             f"Model `{results['model']}`; reasoning-gym {results['reasoning_gym']} tasks "
             f"{', '.join(results['tasks'])} (problems {results['first_seed']}..{results['first_seed'] + results['samples'] - 1} of each, "
             f"dataset seed {DATASET_SEED}); greedy answers of at most {results['max_tokens']} tokens, scored by "
             "the generator's answer check on the last `\\boxed{}` (else the last number). Budget b: kv_budget = "
             "prompt + ceil(b x the full cache's answer length on that problem); every policy keeps the same "
             f"recent window W = {results['window']} (the model's LazyEviction window; `<policy>:half`: half the "
             f"budget, H2O's own split) and {results['sink']} sinks; lazy evicts every W tokens, the "
             "others every token. Agreement: the share of the full cache's first "
             f"{results['agreement_tokens']} answer tokens repeated at the same position. Decode speed: median "
             "of the per-problem ratios to the full cache.", "",
             f"The full cache: accuracy {full['accuracy']:.3f} (n = {full['n']}), {full['answer_tokens']:.0f} "
             f"answer tokens and {full['peak_cells']:.0f} cells on average, {full['decode_tok_s']:.1f} tok/s.", "",
             "| policy | budget | n | accuracy | vs full | 95% interval | agreement | peak cells | of full | "
             "above budget (max) | decode vs full |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_config = {(p["policy"], p["budget"]): p for p in results["paired"]}
    for s in summary:
        if s["policy"] == FULL:
            continue
        p = by_config.get((s["policy"], s["budget"]))
        diff = f"{p['difference']:+.3f}" if p else "—"
        interval = f"[{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]" if p else "—"
        speed = f"{s['decode_vs_full']:.2f}" if s["decode_vs_full"] is not None else "—"
        lines.append(f"| {s['policy']} | {s['budget']} | {s['n']} | {s['accuracy']:.3f} | {diff} | {interval} | "
                     f"{s['agreement']:.3f} | {s['peak_cells']:.0f} | {s['peak_cells_vs_full']:.2f} | "
                     f"{s['peak_above_budget']} | {speed} |")
    lines += ["", "Accuracy by task:", "", "| policy | budget | " + " | ".join(results["tasks"]) + " |",
              "|---|---|" + "---|" * len(results["tasks"])]
    for entry in results["by_task"]:
        lines.append(f"| {entry['policy']} | {entry['budget']} | " +
                     " | ".join(f"{entry[t]:.3f}" for t in results["tasks"]) + " |")
    lines += [""] + paired_table("Paired against the full cache", "Problem by problem, 95% paired bootstrap "
                                 "intervals; differ = problems scored differently.", "partner", "full",
                                 [{**p, "setting": "reasoning", "keep": p["budget"]} for p in results["paired"]],
                                 keep_header="budget")
    return "\n".join(lines) + "\n"


def by_task(rows: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    out = []
    for policy, budget in dict.fromkeys((r["policy"], r["budget"]) for r in rows):
        entry: dict[str, Any] = {"policy": policy, "budget": budget}
        for task in tasks:
            scores = [r["score"] for r in rows if (r["policy"], r["budget"], r["task"]) == (policy, budget, task)]
            entry[task] = float(np.mean(scores)) if scores else float("nan")
        out.append(entry)
    return out


def plot(results: dict[str, Any], path: Path) -> Path:
    plt = report.pyplot()
    summary = results["summary"]
    full = next(s for s in summary if s["policy"] == FULL)
    policies = [p for p in dict.fromkeys(s["policy"] for s in summary) if p != FULL]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, policy in enumerate(policies):
        entries = sorted((s for s in summary if s["policy"] == policy), key=lambda s: s["budget"])
        budgets = [s["budget"] for s in entries]
        axes[0].plot(budgets, [s["accuracy"] for s in entries], "o-", color=f"C{i}", label=policy)
        axes[1].plot(budgets, [s["agreement"] for s in entries], "o-", color=f"C{i}", label=policy)
    axes[0].axhline(full["accuracy"], color="black", linestyle="--", label="full cache")
    axes[0].set_ylabel("final-answer accuracy")
    axes[1].set_ylabel("token agreement with the full cache")
    for ax in axes:
        ax.set_xlabel("budget (share of the full answer length, beyond the prompt)")
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['model']}: {', '.join(results['tasks'])}, n = {full['n']}", fontsize=9)
    return report.save_figure(fig, path)


def model_window(model: str, window: int | None) -> int:
    """The recent window every policy keeps: ``--window``, else the model's LazyEviction calibration's, else the
    settings' default (``kvgguf.settings.DEFAULT_LAZY_WINDOW``)."""
    from ..calibrate_lazy import shipped_calibration
    from ..settings import DEFAULT_LAZY_WINDOW

    if window is not None:
        if window < 1:
            raise ValueError(f"--window must be >= 1, got {window}")
        return window
    calibration = shipped_calibration(model)
    return int(calibration["window"]) if calibration else DEFAULT_LAZY_WINDOW


def main(args: argparse.Namespace) -> int:
    from importlib import metadata

    for policy in args.policies:
        name, _, variant = policy.partition(":")
        if name not in POLICIES or not POLICIES[name].evicts_while_decoding:
            raise ValueError(f"--policies: {name!r} is not a policy that evicts while decoding; known: "
                             f"{sorted(p for p, c in POLICIES.items() if c.evicts_while_decoding)}")
        if variant not in ("", HALF) or (variant and POLICIES[name].tracks_recurrence):
            raise ValueError(f"--policies: {policy!r}: the one variant is '<policy>:{HALF}' (a recent window of half "
                             "the budget), for a policy whose window is not its observation window")
    for budget in args.budgets:
        if not 0.0 < budget < 1.0:
            raise ValueError(f"--budgets: {budget} is not in (0, 1)")
    for name, value, least in (("--samples", args.samples, 1), ("--max-tokens", args.max_tokens, 1),
                               ("--first-seed", args.first_seed, 0), ("--agreement-tokens", args.agreement_tokens, 1)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    problems = load_problems(args.tasks, args.first_seed, args.samples)
    model = str(resolve_model(args.model))
    window = model_window(model, args.window)
    logger.info("%d problems; recent window W = %d; budgets %s of the full answer beyond the prompt",
                len(problems), window, args.budgets)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    env = report.environment(args.threads)
    llm = Llama(model, n_ctx=args.n_ctx, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads,
                verbose=False)
    try:
        rows = run(llm, problems, args.policies, args.budgets, window, args.max_tokens, args.agreement_tokens,
                   output / "reasoning.rows.jsonl")
    finally:
        llm.close()
    summary = summarize(rows)
    results = {"model": Path(model).name, "tasks": args.tasks, "first_seed": args.first_seed,
               "samples": args.samples, "dataset_seed": DATASET_SEED, "max_tokens": args.max_tokens,
               "agreement_tokens": args.agreement_tokens, "budgets": args.budgets, "policies": args.policies,
               "window": window, "sink": DEFAULT_SINK, "reasoning_gym": metadata.version("reasoning-gym"),
               "summary": summary, "by_task": by_task(rows, args.tasks), "paired": paired_with_full(rows),
               "rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows], "environment": env}
    report.publish("reasoning", results, lambda: markdown(results), lambda path: plot(results, path), output,
                   args.threads)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report.add_common_arguments(parser)
    parser.add_argument("--tasks", type=lambda t: t.split(","), default=["gsm_symbolic"],
                        help="reasoning-gym datasets, comma-separated")
    parser.add_argument("--policies", type=lambda t: t.split(","), default=list(DECODE_TIME_POLICIES) + ["h2o:half"],
                        help="decode-time policies, comma-separated (the full cache always runs); '<policy>:half' "
                        "keeps a recent window of half the budget instead of W (H2O's own split)")
    parser.add_argument("--budgets", type=lambda t: [float(x) for x in t.split(",")], default=[0.25, 0.5, 0.75],
                        help="shares of the full cache's answer length the cache keeps beyond the prompt")
    parser.add_argument("--samples", type=int, default=30, help="problems per task")
    parser.add_argument("--first-seed", type=int, default=0, help="the first problem of each task")
    parser.add_argument("--max-tokens", type=int, default=512, help="the longest answer, in tokens")
    parser.add_argument("--agreement-tokens", type=int, default=1024,
                        help="how many of the full cache's first answer tokens the agreement compares")
    parser.add_argument("--window", type=int, help="the recent window W (default: the model's LazyEviction "
                        "calibration, kvgguf/lazy_windows/)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="the context (prompt + answer must fit)")
