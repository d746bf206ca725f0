"""``kvgguf bench serve``: a bounded load run against ``kvgguf serve`` on loopback: requests per second and p50/p95
latency with and without eviction, and answering from a compressed context.

The server runs in its own process (``kvgguf serve``, the model's own threads), started and stopped here. Each
configuration sends the same number of chat requests from a few concurrent clients: a document of about
``--doc-tokens`` tokens with a vault code planted in it (a different document per request, so nothing is reused
from the request before) and the question, answered greedily. The configurations:

- ``off``: no eviction (the server's default);
- one per ``--policies`` entry: the same requests with ``kv_eviction`` and ``kv_keep`` set per request;
- ``context``: the first document compressed once (``POST /v1/contexts``, KVzip at ``--keep``; its time is
  reported apart), then the requests ask its question with ``"context": id`` and no document.

The run is bounded in count (``--requests`` per configuration) and in time (``--max-seconds`` per configuration:
no request starts after it). Answers are scored (the code in the answer) so that speed is never bought with wrong
answers unseen.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..models import resolve_model
from ..text import haystack
from . import report
from .specs import check_spec

logger = logging.getLogger(__name__)

QUESTION = "What is the secret code for the vault? Answer with the number."
MAX_TOKENS = 24
STARTUP_SECONDS = 180


def _post(url: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


class ServerProcess:
    """``kvgguf serve`` in a child process on a free loopback port."""

    def __init__(self, model: str, n_ctx: int, threads: int, contexts_dir: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvgguf", "serve", "-m", model, "-c", str(n_ctx), "-t", str(threads),
             "--host", "127.0.0.1", "--port", str(self.port), "--contexts-dir", contexts_dir],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.log.seek(0)
                    raise RuntimeError("kvgguf serve did not start:\n" + self.log.read().decode()[-3000:])
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def documents(n: int, doc_tokens: int, seed: int) -> list[tuple[str, str]]:
    """``n`` documents of about ``doc_tokens`` tokens (~22 per filler sentence), each with its own code."""
    rng = random.Random(seed)
    made = []
    for i in range(n):
        code = str(rng.randint(1000, 9999))
        sentences = haystack(max(2, doc_tokens // 22), seed=seed * 1000 + i).split(". ")
        sentences.insert(rng.randrange(len(sentences)), f"The secret code for the vault is {code}")
        made.append((". ".join(sentences), code))
    return made


def _run_requests(url: str, bodies: list[dict[str, Any]], codes: list[str], concurrency: int,
                  max_seconds: float) -> dict[str, Any]:
    """Send ``bodies`` from ``concurrency`` clients; none starts after ``max_seconds``."""
    start = time.perf_counter()

    def send(index: int) -> dict[str, Any] | None:
        if time.perf_counter() - start > max_seconds:
            return None
        sent = time.perf_counter()
        out = _post(f"{url}/v1/chat/completions", bodies[index])
        return {"latency_s": time.perf_counter() - sent, "right": codes[index] in out["choices"][0]["message"][
            "content"], "prompt_tokens": out["usage"]["prompt_tokens"], "kv": out["usage"]["kv"]}

    with ThreadPoolExecutor(concurrency) as pool:
        done = [result for result in pool.map(send, range(len(bodies))) if result is not None]
    wall = time.perf_counter() - start
    latencies = sorted(result["latency_s"] for result in done)
    return {"requests": len(done), "wall_s": wall, "requests_per_s": len(done) / wall,
            "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
            "accuracy": sum(result["right"] for result in done) / len(done),
            "mean_prompt_tokens": statistics.mean(result["prompt_tokens"] for result in done),
            "mean_cells_after": statistics.mean(result["kv"]["cells_now"] for result in done),
            "evictions": sum(result["kv"]["evictions"] for result in done)}


def run(model: str, n_ctx: int, threads: int, policies: list[str], keep: float, n_requests: int, concurrency: int,
        doc_tokens: int, max_seconds: float, seed: int) -> dict[str, Any]:
    docs = documents(n_requests, doc_tokens, seed)
    rows = []
    with tempfile.TemporaryDirectory() as contexts_dir:
        server = ServerProcess(model, n_ctx, threads, contexts_dir)
        try:
            base = {"max_tokens": MAX_TOKENS, "temperature": 0}
            bodies = [{**base, "messages": [{"role": "user", "content": f"{doc}\n\n{QUESTION}"}]} for doc, _ in docs]
            codes = [code for _, code in docs]
            _post(f"{server.url}/v1/chat/completions", bodies[0])  # warm-up: the first request's one-time costs
            for config in ["off"] + policies:
                extra = {} if config == "off" else {"kv_eviction": config, "kv_keep": keep}
                logger.info("bench serve: %s", config)
                row = _run_requests(server.url, [{**body, **extra} for body in bodies], codes, concurrency,
                                    max_seconds)
                rows.append({"config": config, "keep": keep if extra else 1.0, **row})
            started = time.perf_counter()
            context = _post(f"{server.url}/v1/contexts", {"document": docs[0][0], "kv_keep": keep})
            compress_s = time.perf_counter() - started
            asks = [{**base, "context": context["id"], "messages": [{"role": "user", "content": QUESTION}]}
                    for _ in docs]
            row = _run_requests(server.url, asks, [docs[0][1]] * len(asks), concurrency, max_seconds)
            rows.append({"config": "context", "keep": keep, **row, "compress_s": compress_s,
                         "context_tokens": context["n_tokens"]})
        finally:
            server.stop()
    off = rows[0]
    for row in rows:
        row["requests_per_s_vs_off"] = row["requests_per_s"] / off["requests_per_s"]
        row["p50_vs_off"] = row["p50_s"] / off["p50_s"]
    return {"n_ctx": n_ctx, "requests": n_requests, "concurrency": concurrency, "doc_tokens": doc_tokens,
            "max_tokens": MAX_TOKENS, "max_seconds": max_seconds, "keep": keep, "seed": seed, "rows": rows}


def markdown(results: dict[str, Any], env: dict[str, Any]) -> str:
    lines = ["# kvgguf bench serve", "",
             f"`{env['command']}` — commit `{env['commit']}`, {env['cpu']}, {env['threads']} threads, load "
             f"{env['load_average']}.", "",
             f"`kvgguf serve` on loopback (its own process, n_ctx {results['n_ctx']}); {results['requests']} chat "
             f"requests per configuration from {results['concurrency']} concurrent clients, each a document of about "
             f"{results['doc_tokens']} tokens with a planted code and its question, {results['max_tokens']} answer "
             f"tokens at most, greedy; no request starts after {results['max_seconds']} s. `context`: the first "
             "document compressed once (POST /v1/contexts, KVzip), then only the question per request. Requests "
             "are served one at a time, so concurrency raises latency, not throughput.", "",
             "| config | keep | requests | req/s | req/s vs off | p50 s | p95 s | p50 vs off | prompt tokens | "
             "cells after | answers right |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['config']} | {row['keep']} | {row['requests']} | {row['requests_per_s']:.2f} | "
                     f"{row['requests_per_s_vs_off']:.2f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} | "
                     f"{row['p50_vs_off']:.2f} | {row['mean_prompt_tokens']:.0f} | {row['mean_cells_after']:.0f} | "
                     f"{row['accuracy']:.0%} |")
    context = results["rows"][-1]
    lines += ["", f"Compressing the context once took {context['compress_s']:.1f} s for its "
                  f"{context['context_tokens']} tokens.", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    plt = report.pyplot()
    rows = results["rows"]
    labels = [row["config"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    bars = left.bar(labels, [row["requests_per_s"] for row in rows], color="#2a7ab9")
    left.bar_label(bars, fmt="%.2f", fontsize=8)
    left.set_ylabel("requests / s")
    left.set_title("throughput", fontsize=9)
    x = range(len(rows))
    right.bar([i - 0.2 for i in x], [row["p50_s"] for row in rows], 0.4, label="p50", color="#2a7ab9")
    right.bar([i + 0.2 for i in x], [row["p95_s"] for row in rows], 0.4, label="p95", color="#aaaaaa")
    right.set_xticks(list(x), labels)
    right.set_ylabel("latency s")
    right.set_title(f"latency, {results['concurrency']} concurrent clients", fontsize=9)
    right.legend(fontsize=8)
    return report.save_figure(fig, path)


def main(args: argparse.Namespace) -> int:
    for name, value, least in (("--requests", args.requests, 1), ("--concurrency", args.concurrency, 1),
                               ("--doc-tokens", args.doc_tokens, 50), ("--n-ctx", args.n_ctx, 256)):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if args.max_seconds <= 0:
        raise ValueError(f"--max-seconds must be > 0, got {args.max_seconds}")
    for policy in args.policies:
        check_spec(policy, args.keep)
        if "@" in policy or "+" in policy:
            raise ValueError(f"--policies {policy!r}: a request names a policy only (no @granularity, no +profile)")
    from ..server.cli import check_server_extra

    check_server_extra()
    model = str(resolve_model(args.model))
    env = report.environment(args.threads)
    results = run(model, args.n_ctx, args.threads, args.policies, args.keep, args.requests, args.concurrency,
                  args.doc_tokens, args.max_seconds, args.seed)
    results.update(model=Path(model).name, environment=env)
    report.publish("serve", results, lambda: markdown(results, env), lambda path: plot(results, path),
                   Path(args.output), args.threads)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report.add_common_arguments(parser)
    parser.set_defaults(output=str(report.DEFAULT_OUTPUT / "serve"))
    parser.add_argument("--n-ctx", type=int, default=4096, help="the server's context")
    parser.add_argument("--policies", type=lambda t: t.split(","), default=["snapkv", "streaming"],
                        help="per-request policies, comma-separated")
    parser.add_argument("--keep", type=float, default=0.3, help="kv_keep of the requests and of the context")
    parser.add_argument("--requests", type=int, default=32, help="requests per configuration")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent clients")
    parser.add_argument("--doc-tokens", type=int, default=1000, help="about this many tokens per document")
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="per configuration: no request starts after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
