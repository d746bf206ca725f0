"""``kvgguf bench speed``: what eviction costs and what it buys, on one machine, in one run.

For an 8K-token prompt it measures the prefill, SnapKV's scoring + eviction + compaction, and decode speed of
(a) the full 8K cache, (b) the 8K prompt compressed to 2K cells, (c) a fresh 2K prompt; plus the time to remove
6K scattered cells from 8K in one call. Decode speeds are medians of per-token latencies, taken in interleaved
rounds so that machine noise hits all three alike; the targets are ratios.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..engine import KVCacheView
from ..llama import Llama
from ..models import default_model_path
from ..text import haystack
from . import report


def filler_tokens(llm: Llama, n_tokens: int, seed: int = 0) -> list[int]:
    """Exactly ``n_tokens`` tokens of filler prose (a sentence is ~20 tokens)."""
    n_sentences = max(1, n_tokens // 10)
    tokens = llm.tokenize(haystack(n_sentences, seed).encode(), add_bos=True)
    while len(tokens) < n_tokens:
        n_sentences *= 2
        tokens = llm.tokenize(haystack(n_sentences, seed).encode(), add_bos=True)
    return tokens[:n_tokens]


def decode_latencies(llm: Llama, tokens: list[int]) -> list[float]:
    """Seconds per single-token decode, one eval per token (the way generation runs)."""
    latencies = []
    for token in tokens:
        start = time.perf_counter()
        llm.eval([token])
        latencies.append(time.perf_counter() - start)
    return latencies


def prefill(llm: Llama, prompt: list[int]) -> float:
    """Prefill through the public completion path (with eviction, when the model has a policy)."""
    start = time.perf_counter()
    llm.create_completion(prompt, max_tokens=1, temperature=0)
    return time.perf_counter() - start


def run(model: str, n_long: int, n_short: int, n_decode: int, rounds: int, threads: int) -> dict[str, Any]:
    n_ctx = n_long + n_decode * rounds + 256
    common = dict(n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    full = Llama(model, **common)
    compressed = Llama(model, kv_eviction="snapkv", kv_budget=n_short, **common)
    fresh = Llama(model, **common)
    long_prompt = filler_tokens(full, n_long)
    short_prompt = filler_tokens(full, n_short, seed=1)
    continuation = filler_tokens(full, n_decode * rounds + 1, seed=2)[1:]

    progress = tqdm(total=3 + 3 * rounds, desc="bench speed", unit="step")
    t_prefill_full = prefill(full, long_prompt)
    progress.update()
    t_prefill_snapkv = prefill(compressed, long_prompt)
    progress.update()
    prefill(fresh, short_prompt)
    progress.update()
    stats = compressed.kv_stats()
    evict_s = stats["score_s"] + stats["evict_s"] + stats["compact_s"]

    latencies: dict[str, list[float]] = {"full_8k": [], "compressed_2k": [], "fresh_2k": []}
    for r in range(rounds):
        chunk = continuation[r * n_decode:(r + 1) * n_decode]
        for label, llm in (("full_8k", full), ("compressed_2k", compressed), ("fresh_2k", fresh)):
            latencies[label] += decode_latencies(llm, chunk)
            progress.update()
    progress.close()
    tok_s = {label: 1.0 / statistics.median(values) for label, values in latencies.items()}
    windows = {"full_8k": full._kv_engine.cache.n_attended(), "compressed_2k": compressed._kv_engine.cache.n_attended(),
               "fresh_2k": fresh._kv_engine.cache.n_attended()}

    # batched removal of 6K scattered cells from 8K (the call alone), and the compaction after it
    full._ctx.kv_cache_seq_rm(-1, n_long, -1)
    cache = KVCacheView(full._ctx.ctx, 0)
    rng = np.random.default_rng(0)
    n_remove = n_long - n_short
    removed = rng.choice(n_long - 1, size=n_remove, replace=False).astype(np.int32)
    start = time.perf_counter()
    freed = cache.remove(removed)
    remove_s = time.perf_counter() - start
    start = time.perf_counter()
    cache.compact()
    compact_s = time.perf_counter() - start
    for llm in (full, compressed, fresh):
        llm.close()

    results = {
        "n_long": n_long, "n_short": n_short, "n_decode_per_round": n_decode, "rounds": rounds,
        "prefill_long_s": t_prefill_full,
        "prefill_long_snapkv_s": t_prefill_snapkv,
        "snapkv": {"score_s": stats["score_s"], "evict_s": stats["evict_s"], "compact_s": stats["compact_s"],
                   "total_s": evict_s, "cells_before": stats["cells_before"], "cells_after": stats["cells_after"],
                   "tap_and_eviction_overhead_s": t_prefill_snapkv - t_prefill_full},
        "decode_tok_s": tok_s,
        "attended_window": windows,
        "remove_scattered": {"cells": int(n_remove), "freed": int(freed), "remove_s": remove_s,
                             "compact_s": compact_s},
        "ratios": {
            "compressed_vs_fresh_decode": tok_s["compressed_2k"] / tok_s["fresh_2k"],
            "compressed_vs_full_decode": tok_s["compressed_2k"] / tok_s["full_8k"],
            "eviction_share_of_prefill": evict_s / t_prefill_full,
            "snapkv_prefill_overhead": (t_prefill_snapkv - t_prefill_full) / t_prefill_full,
        },
        "targets": {
            "compressed_vs_fresh_decode >= 0.95": tok_s["compressed_2k"] / tok_s["fresh_2k"] >= 0.95,
            "eviction_share_of_prefill <= 0.03": evict_s / t_prefill_full <= 0.03,
            "remove 6K scattered of 8K <= 2 ms": remove_s <= 0.002,
        },
        "latencies_s": latencies,
    }
    return results


def markdown(results: dict[str, Any], env: dict[str, Any]) -> str:
    r = results
    tok = r["decode_tok_s"]
    win = r["attended_window"]
    ratios = r["ratios"]
    lines = [
        "# kvgguf bench speed",
        "",
        f"`{env['command']}` — commit `{env['commit']}`, {env['cpu']}, {env['threads']} threads, "
        f"OMP_WAIT_POLICY={env['omp_wait_policy']}, load average at start {env['load_average']}.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| prefill, {r['n_long']} tokens | {r['prefill_long_s']:.2f} s |",
        f"| prefill + SnapKV (tap on the last window, budget {r['n_short']}) | {r['prefill_long_snapkv_s']:.2f} s |",
        f"| SnapKV scoring + eviction + compaction | {1000 * r['snapkv']['total_s']:.1f} ms "
        f"(score {1000 * r['snapkv']['score_s']:.1f}, select+remove {1000 * r['snapkv']['evict_s']:.1f}, "
        f"compact {1000 * r['snapkv']['compact_s']:.1f}) = {100 * ratios['eviction_share_of_prefill']:.2f}% of prefill |",
        f"| decode, (a) full {r['n_long']} cache (window {win['full_8k']}) | {tok['full_8k']:.1f} tok/s |",
        f"| decode, (b) {r['n_long']} compressed to {r['n_short']} cells (window {win['compressed_2k']}) | "
        f"{tok['compressed_2k']:.1f} tok/s |",
        f"| decode, (c) fresh {r['n_short']} prompt (window {win['fresh_2k']}) | {tok['fresh_2k']:.1f} tok/s |",
        f"| remove {r['remove_scattered']['cells']} scattered cells of {r['n_long']} (one call) | "
        f"{1000 * r['remove_scattered']['remove_s']:.2f} ms |",
        f"| compact after that removal | {1000 * r['remove_scattered']['compact_s']:.1f} ms |",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| (b) >= 0.95 x (c) | {ratios['compressed_vs_fresh_decode']:.3f} | "
        f"{r['targets']['compressed_vs_fresh_decode >= 0.95']} |",
        f"| scoring + eviction <= 3% of the prefill | {100 * ratios['eviction_share_of_prefill']:.2f}% | "
        f"{r['targets']['eviction_share_of_prefill <= 0.03']} |",
        f"| removing 6K scattered cells of 8K <= 2 ms | {1000 * r['remove_scattered']['remove_s']:.2f} ms | "
        f"{r['targets']['remove 6K scattered of 8K <= 2 ms']} |",
        "",
        f"(b) vs (a): {ratios['compressed_vs_full_decode']:.2f}x decode speed. Decode speeds are medians of "
        f"{r['rounds']} interleaved rounds x {r['n_decode_per_round']} single-token decodes per configuration.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tok = results["decode_tok_s"]
    labels = [f"(a) full {results['n_long']}", f"(b) {results['n_long']}→{results['n_short']} SnapKV",
              f"(c) fresh {results['n_short']}"]
    values = [tok["full_8k"], tok["compressed_2k"], tok["fresh_2k"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(labels, values, color=["#888888", "#2a7ab9", "#7fb3d5"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylim(0, 1.2 * max(values))
    ax.set_ylabel("decode tokens / s")
    ax.set_title("Decode speed after eviction (median per-token latency)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    model = args.model or str(default_model_path())
    env = report.environment(args.threads)
    results = run(model, args.n_long, args.n_short, args.n_decode, args.rounds, args.threads)
    results["environment"] = env
    report.publish("speed", results, markdown(results, env), lambda path: plot(results, path), Path(args.output),
                   args.threads)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--n-long", type=int, default=8192, help="tokens of the long prompt")
    parser.add_argument("--n-short", type=int, default=2048, help="cells kept / tokens of the short prompt")
    parser.add_argument("--n-decode", type=int, default=32, help="decoded tokens per configuration and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", default=str(report.DEFAULT_OUTPUT), help="folder for JSON/markdown/PNG")
