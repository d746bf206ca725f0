"""``kvgguf bench scores``: how well each policy's scores foresee the cells the answer will attend to.

The examples are the held-out prompts of ``kvgguf train-lookahead`` (``kvgguf.lookahead_data``: seeds that no
training prompt and no bench task uses), each with the model's own greedy answer and, as the truth, that
answer's mean attention to the prompt per (layer, KV head), read with the tap over the teacher-forced answer:
what LookaheadKV learns to predict (``kvgguf.train_lookahead.make_examples`` makes and caches them). Each policy
prefills the prompt and scores its cells; its scores are the ones its eviction ranks (``Llama.kv_scores``).
Per (layer, KV head), over the cells a policy may evict (neither the sinks nor the observation window):

- **KL**(truth || the policy's attention before its pooling, normalized over those cells: what LookaheadKV is
  trained to minimize; ``Policy.last_attention``, None for a policy whose scores are no attention, such as
  KVzip's maxima); for ``random``, the uniform distribution;
- **recall@10%**: the share of the truth's top 10% of those cells that are among the top 10% of the scores the
  eviction ranks (pooled) (``random``: a random ranking, about 0.1).

Means over the heads per example; the summary gives the means over the examples with 95% bootstrap intervals,
over all of them and per kind of prompt, and each policy beside ``--paired-against`` (default snapkv) example
by example.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from ..llama import Llama
from ..lookahead_data import KINDS
from ..models import resolve_model
from ..policies import POLICIES
from ..settings import DEFAULT_SINK, DEFAULT_WINDOW
from . import report

RANDOM = "random"
TOP_FRACTION = 0.1
EPSILON = 1e-8  # added inside the logarithms: a truth or a score of 0 stays finite
DEFAULT_DATA = Path.home() / ".cache" / "kvgguf" / "lookahead-heldout"


def kl_divergence(truth: npt.NDArray[np.float64], scores: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """KL(truth || scores) per row of the last axis, both normalized over it (scores clipped at 0)."""
    truth = truth / np.maximum(truth.sum(axis=-1, keepdims=True), 1e-30)
    scores = np.clip(scores, 0.0, None)
    scores = scores / np.maximum(scores.sum(axis=-1, keepdims=True), 1e-30)
    return (truth * (np.log(truth + EPSILON) - np.log(scores + EPSILON))).sum(axis=-1)


def top_recall(truth: npt.NDArray[np.float64], scores: npt.NDArray[np.float64],
               fraction: float = TOP_FRACTION) -> npt.NDArray[np.float64]:
    """Per row of the last axis: the share of the truth's top ``fraction`` of cells that the scores' top
    ``fraction`` holds (the same count, at least one)."""
    n = truth.shape[-1]
    k = max(1, math.ceil(fraction * n))
    true_top = np.argpartition(-truth, k - 1, axis=-1)[..., :k]
    score_top = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    chosen = np.zeros(truth.shape, dtype=bool)
    np.put_along_axis(chosen, score_top, True, axis=-1)
    return np.take_along_axis(chosen, true_top, axis=-1).mean(axis=-1)


def policy_scores(llm: Llama, policy: str, prompt: list[int],
                  lookahead: str | None) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64] | None]:
    """``policy``'s scores of every prompt cell after a prefill of ``prompt``, [n_layer, n_head_kv, n], and the
    attention behind them before pooling where the policy's scores are attention (``Policy.last_attention``)."""
    llm.configure_kv_eviction(policy, kv_keep=0.5, kv_lookahead=lookahead if policy == "lookahead" else None,
                              kv_head_profile=None)
    llm.prefill(prompt)
    result = llm.kv_scores()
    if result is None or not np.array_equal(result["positions"], np.arange(len(prompt))):
        raise RuntimeError(f"{policy!r} did not score the {len(prompt)} prompt cells in one eviction")
    scores = np.asarray(result["scores"], dtype=np.float64)
    if scores.ndim == 1:  # one score per token: every head ranks alike
        scores = np.broadcast_to(scores, (llm.kv_controller.scoring.n_layer, llm.kv_controller.scoring.n_head_kv,
                                          scores.size))
    attention = llm.kv_controller.policy.last_attention
    return scores, (np.asarray(attention, dtype=np.float64) if attention is not None else None)


def measure(llm: Llama, examples: list[Path], policies: list[str], lookahead: str | None,
            progress: tqdm) -> list[dict[str, Any]]:
    """One row per example and policy (and ``random``): its KL and recall, averaged over the (layer, head)s."""
    rng = np.random.default_rng(0)
    rows = []
    for path in examples:
        data = np.load(path)
        prompt = data["prompt"].tolist()
        truth_all = data["target"].astype(np.float64)
        seed = int(path.stem)
        base = {"seed": seed, "kind": KINDS[seed % len(KINDS)], "prompt_tokens": len(prompt),
                "response_tokens": int(data["response"].size)}
        evictable = slice(DEFAULT_SINK, len(prompt) - DEFAULT_WINDOW)  # every policy protects the same cells
        truth = truth_all[..., evictable]
        for policy in policies + [RANDOM]:
            if policy == RANDOM:
                kl = kl_divergence(truth, np.ones_like(truth))
                recall = top_recall(truth, rng.random(truth.shape))
            else:
                scores, attention = policy_scores(llm, policy, prompt, lookahead)
                recall = top_recall(truth, scores[..., evictable])
                kl = kl_divergence(truth, attention[..., evictable]) if attention is not None else None
            rows.append({**base, "policy": policy, "kl": float(np.mean(kl)) if kl is not None else None,
                         "recall": float(np.mean(recall)),
                         "evictable_cells": int(truth.shape[-1])})
            progress.update()
    return rows


def bootstrap_ci(values: npt.ArrayLike, resamples: int = 10_000) -> list[float]:
    """95% bootstrap interval of the mean of ``values`` (seeded: the same values give the same interval)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    return [float(x) for x in np.quantile(means, [0.025, 0.975])]


def summarize(rows: list[dict[str, Any]], reference: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per policy and kind (``all`` too): mean KL and recall with intervals; and per policy, its difference from
    ``reference`` example by example (recall: policy - reference; KL: reference - policy, so that ahead is > 0
    in both)."""
    summary = []
    policies = list(dict.fromkeys(row["policy"] for row in rows))
    kinds = ["all"] + [kind for kind in KINDS if any(row["kind"] == kind for row in rows)]
    for policy in policies:
        for kind in kinds:
            part = [row for row in rows if row["policy"] == policy and kind in ("all", row["kind"])]
            kls = [r["kl"] for r in part if r["kl"] is not None]
            summary.append({"policy": policy, "kind": kind, "n": len(part),
                            "kl": float(np.mean(kls)) if kls else None, "kl_ci95": bootstrap_ci(kls) if kls else None,
                            "recall": float(np.mean([r["recall"] for r in part])),
                            "recall_ci95": bootstrap_ci([r["recall"] for r in part])})
    by_key = {(row["policy"], row["seed"]): row for row in rows}
    paired = []
    for policy in policies:
        if policy == reference:
            continue
        seeds = [seed for p, seed in by_key if p == policy and (reference, seed) in by_key]
        recall = [by_key[(policy, s)]["recall"] - by_key[(reference, s)]["recall"] for s in seeds]
        kl = [by_key[(reference, s)]["kl"] - by_key[(policy, s)]["kl"] for s in seeds
              if by_key[(reference, s)]["kl"] is not None and by_key[(policy, s)]["kl"] is not None]
        paired.append({"policy": policy, "reference": reference, "n": len(seeds),
                       "recall_gain": float(np.mean(recall)), "recall_gain_ci95": bootstrap_ci(recall),
                       "kl_reduction": float(np.mean(kl)) if kl else None,
                       "kl_reduction_ci95": bootstrap_ci(kl) if kl else None})
    return summary, paired


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = ["# kvgguf bench scores", "",
             f"`{env['command']}` — commit `{env['commit']}`, {env['cpu']}, {env['threads']} threads.", "",
             f"{results['examples']} held-out prompts of `kvgguf train-lookahead` ({results['prompt_tokens_mean']:.0f} "
             f"tokens on average), each with the model's greedy answer ({results['response_tokens_mean']:.0f} "
             "tokens on average); the truth is the answer's mean attention to the prompt per (layer, KV head). "
             "Over the cells a policy may evict (neither the sinks nor the window), per (layer, KV head): KL(truth "
             "|| the policy's attention before pooling, normalized; — where its scores are no attention), and the "
             f"recall of the truth's top {TOP_FRACTION:.0%} cells by the top {TOP_FRACTION:.0%} of the scores its "
             "eviction ranks (pooled); averaged over the heads, then over the prompts with 95% bootstrap "
             "intervals. `random`: uniform (KL) and a random ranking (recall).", "",
             "| policy | prompts | KL | 95% interval | recall@10% | 95% interval |", "|---|---|---|---|---|---|"]
    for entry in (s for s in results["summary"] if s["kind"] == "all"):
        lines.append(f"| {entry['policy']} | {entry['n']} | {_value(entry['kl'])} | {_interval(entry['kl_ci95'])} | "
                     f"{entry['recall']:.3f} | {_interval(entry['recall_ci95'])} |")
    kinds = list(dict.fromkeys(s["kind"] for s in results["summary"] if s["kind"] != "all"))
    lines += ["", "Recall@10% by kind of prompt (n per kind):", "",
              "| policy | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for policy in dict.fromkeys(s["policy"] for s in results["summary"]):
        cells = [next(f"{s['recall']:.3f} (n={s['n']})" for s in results["summary"]
                      if (s["policy"], s["kind"]) == (policy, kind)) for kind in kinds]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    if results["paired"]:
        reference = results["paired"][0]["reference"]
        lines += ["", f"Beside {reference}, prompt by prompt (ahead is > 0 in both):", "",
                  "| policy | prompts | recall gain | 95% interval | KL reduction | 95% interval |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {p['policy']} | {p['n']} | {_value(p['recall_gain'], '+.3f')} | "
                  f"{_interval(p['recall_gain_ci95'], '+.3f')} | {_value(p['kl_reduction'], '+.3f')} | "
                  f"{_interval(p['kl_reduction_ci95'], '+.3f')} |" for p in results["paired"]]
    return "\n".join(lines) + "\n"


def _value(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _interval(interval: list[float] | None, spec: str = ".3f") -> str:
    return "—" if interval is None else f"[{format(interval[0], spec)}, {format(interval[1], spec)}]"


def plot(results: dict[str, Any], path: Path) -> Path:
    plt = report.pyplot()
    summary = results["summary"]
    policies = list(dict.fromkeys(s["policy"] for s in summary))
    kinds = list(dict.fromkeys(s["kind"] for s in summary))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(policies)
    for metric, ax in zip(("recall", "kl"), axes, strict=True):
        for i, policy in enumerate(policies):
            entries = [next(s for s in summary if (s["policy"], s["kind"]) == (policy, kind)) for kind in kinds]
            if any(e[metric] is None for e in entries):
                continue  # no attention behind its scores: no KL
            values = [e[metric] for e in entries]
            errors = np.array([[e[metric] - e[f"{metric}_ci95"][0], e[f"{metric}_ci95"][1] - e[metric]]
                               for e in entries]).T
            ax.bar(np.arange(len(kinds)) + i * width, values, width, yerr=errors, capsize=2, label=policy,
                   color=f"C{i}")  # a policy's colour in both panels
        ax.set_xticks(np.arange(len(kinds)) + width * (len(policies) - 1) / 2, kinds, fontsize=8)
        ax.set_ylabel(f"recall of the true top {TOP_FRACTION:.0%}" if metric == "recall" else
                      "KL(truth || attention)")
    axes[0].legend(fontsize=8)
    return report.save_figure(fig, path)


def main(args: argparse.Namespace) -> int:
    from ..train_lookahead import TrainSettings, make_examples

    for policy in args.policies:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {sorted(POLICIES)}")
    if args.paired_against not in args.policies + [RANDOM]:
        raise ValueError(f"--paired-against {args.paired_against!r} is not one of the policies run: "
                         f"{args.policies + [RANDOM]}")
    if args.examples < 1:
        raise ValueError(f"--examples must be >= 1, got {args.examples}")
    model = str(resolve_model(args.model))
    data = Path(args.data) if args.data else DEFAULT_DATA / Path(model).stem
    env = report.environment(args.threads)
    settings = TrainSettings(model=model, output="", work_dir=str(data), threads=args.threads,
                             max_response=args.max_response)
    examples = make_examples(settings, "heldout", args.examples)
    longest = max(np.load(path)["prompt"].size for path in examples)
    llm = Llama(model, n_ctx=report.cells_for(args.policies, longest + 64), n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    progress = tqdm(total=len(examples) * (len(args.policies) + 1), desc="bench scores", unit="score")
    try:
        rows = measure(llm, examples, args.policies, args.lookahead, progress)
    finally:
        progress.close()
        llm.close()
    summary, paired = summarize(rows, args.paired_against)
    results = {"model": Path(model).name, "examples": len(examples), "policies": args.policies + [RANDOM],
               "top_fraction": TOP_FRACTION, "data": str(data), "max_response": args.max_response,
               "lookahead": args.lookahead, "prompt_tokens_mean": float(np.mean([r["prompt_tokens"] for r in rows])),
               "response_tokens_mean": float(np.mean([r["response_tokens"] for r in rows])),
               "summary": summary, "paired": paired, "rows": rows, "environment": env}
    report.publish("scores", results, lambda: markdown(results), lambda path: plot(results, path),
                   Path(args.output), args.threads)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report.add_common_arguments(parser)
    parser.add_argument("--policies", type=lambda t: t.split(","), default=["lookahead", "snapkv", "kvzip"],
                        help="policies whose scores to judge, comma-separated (random is always added)")
    parser.add_argument("--paired-against", default="snapkv", metavar="POLICY",
                        help="compare every other policy with this one, prompt by prompt")
    parser.add_argument("--examples", type=int, default=48, help="held-out prompts (train-lookahead's --n-heldout)")
    parser.add_argument("--max-response", type=int, default=512, help="the longest greedy answer, in tokens")
    parser.add_argument("--data", help=f"where the held-out examples are cached (default {DEFAULT_DATA}/<model>); "
                        "a train-lookahead work folder of the same model holds them already")
    parser.add_argument("--lookahead", help="the lookahead module (default: the one shipped for the model)")
