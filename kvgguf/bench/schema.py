"""The JSON layout of every benchmark's results: the keys each file and each of its rows must have.

``report.publish`` checks results against it before writing, and the tests check both fresh runs and the files
committed under docs/benchmarks/, so a change of layout is deliberate: bump SCHEMA_VERSION and say what changed.
Extra keys are allowed (new measurements); missing ones are not.
"""
from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 2  # 1: speed had a single 8K -> 2K case; 2: speed per length x config, memory added

ENVIRONMENT_KEYS = {"date", "commit", "python", "platform", "cpu", "cpu_count", "threads", "omp_wait_policy",
                    "load_average", "load_average_end", "versions", "command"}

SCHEMAS: dict[str, dict[str, set[str]]] = {
    "accuracy": {
        "top": {"schema_version", "model", "profile", "lengths", "keeps", "samples", "summary", "rows",
                "environment"},
        "summary": {"setting", "policy", "keep", "task", "length", "accuracy", "n"},
        "rows": {"task", "length", "seed", "policy", "keep", "setting", "score", "output", "prompt_tokens",
                 "cells_after_eviction"},
    },
    "speed": {
        "top": {"schema_version", "model", "profile", "lengths", "keep", "policies", "rounds", "prefill_rounds",
                "n_decode_per_round", "baseline_library", "rows", "ratios", "remove_scattered", "targets",
                "environment"},
        "rows": {"length", "config", "prompt_tokens", "prefill_s", "prefill_rounds_s", "decode_tok_s",
                 "decode_latencies_s", "cells", "attended"},
        "ratios": {"length"},
        "remove_scattered": {"length", "cells", "freed", "remove_s", "compact_s"},
    },
    "scores": {
        "top": {"schema_version", "model", "examples", "policies", "top_fraction", "summary", "paired", "rows",
                "environment"},
        "summary": {"policy", "kind", "n", "kl", "kl_ci95", "recall", "recall_ci95"},
        "paired": {"policy", "reference", "n", "recall_gain", "recall_gain_ci95", "kl_reduction",
                   "kl_reduction_ci95"},
        "rows": {"seed", "kind", "prompt_tokens", "response_tokens", "policy", "kl", "recall"},
    },
    "reasoning": {
        "top": {"schema_version", "model", "tasks", "first_seed", "samples", "max_tokens", "budgets", "policies",
                "window", "summary", "by_task", "paired", "rows", "environment"},
        "summary": {"policy", "budget", "n", "accuracy", "agreement", "peak_cells", "peak_cells_vs_full",
                    "decode_tok_s", "decode_vs_full"},
        "paired": {"policy", "budget", "n", "ours", "theirs", "difference", "ci95"},
        "rows": {"task", "seed", "policy", "budget", "kv_budget", "prompt_tokens", "answer_tokens", "output",
                 "extracted", "expected", "score", "peak_cells", "decode_tok_s"},
    },
    "serve": {
        "top": {"schema_version", "model", "n_ctx", "requests", "concurrency", "doc_tokens", "max_tokens",
                "max_seconds", "keep", "seed", "rows", "environment"},
        "rows": {"config", "keep", "requests", "wall_s", "requests_per_s", "p50_s", "p95_s", "accuracy",
                 "mean_prompt_tokens", "mean_cells_after", "evictions", "requests_per_s_vs_off", "p50_vs_off"},
    },
    "memory": {
        "top": {"schema_version", "model", "task", "n_ctx", "factor", "n_prompt_target", "keep", "seed", "rows",
                "environment"},
        "rows": {"policy", "keep", "n_ctx", "prompt_tokens", "seconds", "kv_bytes_allocated", "kv_bytes_end",
                 "cells_end", "bytes_per_cell", "peak_rss_bytes", "rss_before_model_bytes", "rss_after_load_bytes",
                 "score", "output", "kv_allocated_vs_full", "peak_rss_vs_full"},
    },
}


def check(name: str, results: dict[str, Any]) -> None:
    """Raise ValueError naming the first missing key of ``results`` (a ``kvgguf bench <name>`` result)."""
    if name not in SCHEMAS:
        raise ValueError(f"no schema for benchmark {name!r}; known: {sorted(SCHEMAS)}")
    schema = SCHEMAS[name]
    _require(f"{name}", results, schema["top"])
    _require(f"{name}.environment", results["environment"], ENVIRONMENT_KEYS)
    if results["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"{name}: schema_version {results['schema_version']!r}, expected {SCHEMA_VERSION}")
    for part, keys in schema.items():
        if part == "top":
            continue
        value = results[part]
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            _require(f"{name}.{part}[{i}]", item, keys)


def _require(where: str, mapping: Any, keys: set[str]) -> None:
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} is {type(mapping).__name__}, not an object")
    missing = sorted(keys - set(mapping))
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)}")
