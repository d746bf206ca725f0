"""``kvgguf bench memory``: KV bytes and peak RSS for a prompt several times longer than n_ctx.

A single-needle task of ``factor x n_ctx`` tokens (question inside the prompt) is answered

- by each policy with an ``n_ctx``-cell cache: the prompt is prefilled in chunks with eviction between them and
  the result compressed to ``kv_keep``;
- with the full cache it would otherwise need (``n_ctx`` = the prompt length, eviction off).

Each configuration runs in its own process, so its peak RSS (``ru_maxrss``) is its own. The KV bytes are the
cache's allocation (``n_ctx`` cells) and what its cells hold at the end; the answer is scored like
``bench accuracy``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..models import resolve_model
from . import report
from .specs import check_spec, eviction_arguments

TASK = "niah_single"
MAX_ANSWER_TOKENS = 32


def _peak_rss_bytes() -> int:
    """This process's peak resident set. Linux: VmHWM, which starts afresh at exec (ru_maxrss would carry the
    parent's peak into the child); elsewhere ru_maxrss."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def measure(model: str, tokens: dict[str, list[int]], sample: dict[str, Any], n_ctx: int, policy: str | None,
            keep: float, threads: int) -> dict[str, Any]:
    """One configuration, in this process: load, answer the prepared prompt, report memory and the score."""
    from ..llama import Llama
    from .accuracy import PromptTokens, answer
    from .tasks import Sample, score

    rss_start = _peak_rss_bytes()
    eviction = {**eviction_arguments(policy), "kv_keep": keep} if policy else {}
    llm = Llama(model, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False,
                **eviction)
    rss_loaded = _peak_rss_bytes()
    prompt = PromptTokens(**tokens)
    start = time.perf_counter()
    output = answer(llm, prompt, "query-aware", max_tokens=MAX_ANSWER_TOKENS)
    seconds = time.perf_counter() - start
    stats = llm.kv_stats()
    row = {"policy": policy or "full", "keep": keep if policy else 1.0, "n_ctx": llm.n_ctx(),
           "prompt_tokens": len(prompt.context) + len(prompt.question), "seconds": seconds,
           "kv_bytes_allocated": stats["kv_bytes_allocated"], "kv_bytes_end": stats["kv_bytes_now"],
           "cells_end": stats["cells_now"], "bytes_per_cell": stats["bytes_per_cell"],
           "peak_rss_bytes": _peak_rss_bytes(), "rss_before_model_bytes": rss_start,
           "rss_after_load_bytes": rss_loaded, "score": score(Sample(**sample), output), "output": output}
    llm.close()
    return row


def measure_in_child(config: dict[str, Any]) -> dict[str, Any]:
    """``measure`` in a fresh interpreter, so that its peak RSS is not any other configuration's."""
    done = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(config), capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench memory, policy {config['policy']}: the measuring process failed:\n"
                           f"{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare(model: str, n_prompt: int, seed: int) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """The task's prompt tokens and its sample (made here, once, so every configuration answers the same)."""
    from ..llama import Llama
    from .accuracy import split_prompt
    from .tasks import generate

    llm = Llama(model, n_ctx=64, verbose=False)
    sample = generate(TASK, n_prompt, seed, lambda text: len(llm.tokenize(text.encode(), add_bos=False)))
    tokens = split_prompt(llm, llm.chat_formatter(), sample)
    llm.close()
    return {"context": tokens.context, "question": tokens.question}, dataclasses.asdict(sample)


def run(model: str, n_ctx: int, factor: int, policies: list[str], keep: float, seed: int,
        threads: int) -> dict[str, Any]:
    n_prompt = factor * n_ctx
    tokens, sample = prepare(model, n_prompt, seed)
    common = dict(model=model, tokens=tokens, sample=sample, keep=keep, threads=threads)
    # the full cache: room for the whole prompt and the answer
    configs = [dict(policy=None, n_ctx=len(tokens["context"]) + len(tokens["question"]) + MAX_ANSWER_TOKENS)]
    configs += [dict(policy=policy, n_ctx=n_ctx) for policy in policies]
    rows = [measure_in_child({**common, **config}) for config in tqdm(configs, desc="bench memory", unit="config")]
    full = rows[0]
    for row in rows:
        row["kv_allocated_vs_full"] = row["kv_bytes_allocated"] / full["kv_bytes_allocated"]
        row["peak_rss_vs_full"] = row["peak_rss_bytes"] / full["peak_rss_bytes"]
    return {"task": TASK, "n_ctx": n_ctx, "factor": factor, "n_prompt_target": n_prompt, "keep": keep, "seed": seed,
            "rows": rows}


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f}"


def markdown(results: dict[str, Any], env: dict[str, Any]) -> str:
    lines = ["# kvgguf bench memory", "",
             f"`{env['command']}` — commit `{env['commit']}`, {env['cpu']}, {env['threads']} threads.", "",
             f"A {results['task']} prompt of {results['factor']} x n_ctx = {results['n_prompt_target']} tokens "
             f"(question included), answered with an n_ctx = {results['n_ctx']} cache and eviction (chunked "
             f"prefill, then kv_keep = {results['keep']}), and with the full cache it would otherwise need. Each "
             "row ran in its own process; peak RSS includes the model weights (mmap) and the compute buffers.", "",
             "| config | n_ctx (cells) | prompt tokens | KV allocated MiB | KV held at end MiB | peak RSS MiB | "
             "KV vs full | peak RSS vs full | answer right | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        label = row["policy"] if row["policy"] == "full" else f"{row['policy']} (keep {row['keep']})"
        lines.append(f"| {label} | {row['n_ctx']} | {row['prompt_tokens']} | {_mib(row['kv_bytes_allocated'])} | "
                     f"{_mib(row['kv_bytes_end'])} | {_mib(row['peak_rss_bytes'])} | "
                     f"{row['kv_allocated_vs_full']:.3f} | {row['peak_rss_vs_full']:.3f} | {row['score']:.0f} | "
                     f"{row['seconds']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    plt = report.pyplot()
    rows = results["rows"]
    labels = [row["policy"] for row in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.38
    x = range(len(rows))
    kv = ax.bar([i - width / 2 for i in x], [row["kv_bytes_allocated"] / 2**20 for row in rows], width,
                label="KV cache allocated", color="#2a7ab9")
    rss = ax.bar([i + width / 2 for i in x], [row["peak_rss_bytes"] / 2**20 for row in rows], width,
                 label="peak RSS", color="#aaaaaa")
    ax.bar_label(kv, fmt="%.0f", fontsize=8)
    ax.bar_label(rss, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("MiB")
    ax.set_title(f"{results['n_prompt_target']}-token prompt: n_ctx {results['n_ctx']} + eviction vs full cache",
                 fontsize=9)
    ax.legend(fontsize=8)
    return report.save_figure(fig, path)


def main(args: argparse.Namespace) -> int:
    model = str(resolve_model(args.model))
    for policy in args.policies:
        check_spec(policy, args.keep)  # a bad name or ratio fails here, naming it, before any loading
    env = report.environment(args.threads)
    results = run(model, args.n_ctx, args.factor, args.policies, args.keep, args.seed, args.threads)
    results.update(model=Path(model).name, environment=env)
    report.publish("memory", results, lambda: markdown(results, env), lambda path: plot(results, path),
                   Path(args.output), args.threads)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report.add_common_arguments(parser)
    parser.add_argument("--n-ctx", type=int, default=2048, help="cells of the evicting cache")
    parser.add_argument("--factor", type=int, default=4, help="prompt length as a multiple of n_ctx")
    parser.add_argument("--keep", type=float, default=0.5, help="kv_keep after the whole prompt is in")
    parser.add_argument("--policies", type=lambda t: t.split(","), default=["snapkv", "streaming"],
                        help="policies, comma-separated ('+profile': with the model's head profile, kvzip+profile)")
    parser.add_argument("--seed", type=int, default=0)


if __name__ == "__main__":
    # the child side of measure_in_child: one configuration, its result as the last line of stdout
    import kvgguf  # noqa: F401  (points llama-cpp-python at the patched library before anything loads it)

    print(json.dumps(measure(**json.load(sys.stdin))))
