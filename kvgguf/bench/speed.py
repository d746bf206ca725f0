"""``kvgguf bench speed``: what eviction costs and what it buys, on one machine, in one run.

For each context length L it measures, on prompts of generated filler:

- ``off``: kvgguf's patched library with eviction off (prefill of L tokens, decode at L cells);
- ``baseline``: the same pinned llama.cpp built without our patches (scripts/build_baseline.sh), and ``patched``:
  kvgguf's library, each driven by plain ``llama_cpp.Llama`` in its own worker process (baseline_worker.py), the
  same calls: the patches must cost nothing when eviction is off, measured like with like (``off`` shares its
  process with every other configuration's model);
- one entry per policy: prefill of L tokens with the policy compressing to ``keep * L`` cells (its scoring,
  selection and compaction timed separately), then decode at the compressed size;
- ``fresh``: a fresh ``keep * L`` prompt without eviction — what the compressed cache should decode like;
- for a configuration with the model's head profile (``kvzip+profile``, ``kvzip-head``: a tiered cache whose
  heads keep unequal numbers of cells), ``fresh=<config>``: a fresh plain cache holding the bytes that the
  compressed tiers hold (as many full-cache cells' worth), and the KV bytes held and allocated against ``off``'s.

KVzip's prefill includes its reconstruction (the context teacher-forced once more with the tap): its cost is
reported as compression time / plain prefill time (``off``), beside its floor on this machine: a plain prefill
plus the same reconstruction forward without the tap, timed in the same rounds. Its runner gets
``report.RECONSTRUCTION_CELLS`` more cells, so that the whole prompt is scored in one pass (with fewer cells it would
evict piece by piece while prefilling).

Prefill times are the minimum over ``--prefill-rounds``. A policy's prefill ratio is the median over the rounds of
its prefill time / ``off``'s in the same round; each round runs KVzip's forward alone, then ``off``, then KVzip's
compression, so that the pairs on which KVzip's cost and floor are judged are measured back to back (this machine's speed drifts by 10% over
minutes). Decode speeds are medians of single-token latencies taken in interleaved rounds, so machine noise hits
every configuration alike. The results are ratios within one run.
At the longest length it also times the removal of ``L - keep * L`` scattered cells in one call, and at
``DECODE_EVICTION_CELLS`` cells what one decode-time eviction of a few cells costs (what ``kv_evict_every`` does):
left as holes for the next tokens, beside the same eviction with a compaction, and a decode step.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .._native import LIB_DIR
from ..llama import Llama
from ..models import resolve_model
from ..policies import POLICIES
from ..text import haystack
from . import report
from .specs import check_spec, eviction_arguments, policy_of, uses_profile

logger = logging.getLogger(__name__)

QUICK = dict(lengths=[1024, 4096], rounds=2, prefill_rounds=1)
FULL = dict(lengths=[2048, 4096, 8192], rounds=4, prefill_rounds=3)  # 3: a median of paired ratios
KVZIP_MAX_PREFILL_RATIO = 2.8  # compression time / plain prefill time
MAX_EVICTION_SHARE = 0.03  # scoring + eviction + compaction / plain prefill at the longest length (SnapKV, ...)
# ... for a policy that decodes a few rows to score, at LOOKAHEAD_SHARE_LENGTH (or the longest length measured):
# LookaheadKV's 32 rows with its LoRA on (its paper: < 2.2% at 32K on GPUs)
LOOKAHEAD_MAX_EVICTION_SHARE = 0.08
LOOKAHEAD_SHARE_LENGTH = 4096
PROFILE_ONLY_MAX_PREFILL_RATIO = 1.1  # compression by the head profile alone (kvzip-head) / plain prefill time
MIN_DECODE_VS_FRESH = 0.95  # compressed decode speed / a fresh cache's of the kept size (or bytes)
EVICTION_PARTS = ("evictions", "score_s", "evict_s", "compact_s")  # kv_stats() counters, summed over its life
OFF_SLOWDOWN_NOISE = 0.05  # eviction off may be this much slower than the unpatched build (machine noise)
DEFAULT_BASELINE_LIB = (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvgguf" / "baseline-0.3.36"
                        / "kvgguf" / "lib")


def filler_tokens(llm: Llama, n_tokens: int, seed: int = 0) -> list[int]:
    """Exactly ``n_tokens`` tokens of filler prose (a sentence is ~20 tokens)."""
    n_sentences = max(1, n_tokens // 10)
    tokens = llm.tokenize(haystack(n_sentences, seed).encode(), add_bos=True)
    while len(tokens) < n_tokens:
        n_sentences *= 2
        tokens = llm.tokenize(haystack(n_sentences, seed).encode(), add_bos=True)
    return tokens[:n_tokens]


class LocalRunner:
    """A configuration run in this process through kvgguf.Llama."""

    def __init__(self, model: str, n_ctx: int, threads: int, **eviction: Any) -> None:
        self.llm = Llama(model, n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         verbose=False, **eviction)
        self.eviction_rounds: list[dict[str, float]] = []  # per prefill: its evictions' seconds, by part

    def prefill(self, tokens: list[int]) -> float:
        """Seconds for the prompt through the public completion path (with eviction, if the model has a policy);
        the seconds its evictions spent scoring, evicting and compacting go to ``eviction_rounds``."""
        self.llm.reset()
        before = self.llm.kv_stats()
        start = time.perf_counter()
        self.llm.create_completion(tokens, max_tokens=1, temperature=0)
        elapsed = time.perf_counter() - start
        after = self.llm.kv_stats()
        self.eviction_rounds.append({part: after[part] - before[part] for part in EVICTION_PARTS})
        return elapsed

    def reconstruction_forward(self, tokens: list[int]) -> float:
        """Seconds of the policy's reconstruction forward alone, after a plain prefill of ``tokens``: the same
        chunks and decodes as its scoring (``Policy.scoring_forward``), without the tap. KVzip's compression can
        cost no less than a prefill plus this; the difference is what scoring adds to the forward."""
        llm = self.llm
        llm.reset()
        llm.eval(tokens)  # no prompt pending: a plain prefill (the runner's reconstruction reserve stays free)
        controller = llm.kv_controller
        start = time.perf_counter()
        controller.policy.scoring_forward(controller.scoring)
        elapsed = time.perf_counter() - start
        controller.scoring.finish()
        llm.reset()
        return elapsed

    def decode(self, tokens: list[int]) -> list[float]:
        """Seconds per single-token decode, one eval per token (the way generation runs)."""
        latencies = []
        for token in tokens:
            start = time.perf_counter()
            self.llm.eval([token])
            latencies.append(time.perf_counter() - start)
        return latencies

    def state(self) -> dict[str, Any]:
        stats = self.llm.kv_stats()
        return {"cells": stats["cells_now"], "attended": stats["attended_now"],
                "kv_bytes": stats["kv_bytes_now"], "kv_bytes_allocated": stats["kv_bytes_allocated"],
                **({"tier_cells": stats["tier_cells"]} if "tier_cells" in stats else {})}

    def close(self) -> None:
        self.llm.close()


class BaselineRunner:
    """A pinned llama.cpp library through plain llama_cpp.Llama in a child process (baseline_worker.py), driven over
    pipes: the unpatched build, or with ``patched`` kvgguf's own library (the same harness for both)."""

    def __init__(self, library_dir: Path, model: str, n_ctx: int, threads: int, patched: bool = False) -> None:
        env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(library_dir))
        worker = Path(__file__).with_name("baseline_worker.py")
        self.process = subprocess.Popen([sys.executable, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=env, text=True)
        loaded = self._call("load", model=model, n_ctx=n_ctx, threads=threads)
        if loaded["patched"] != patched:
            self.close()
            if patched:
                raise RuntimeError(f"the library in {library_dir} lacks kvgguf's patches")
            raise RuntimeError(f"the baseline library in {library_dir} has kvgguf's patches; build the unpatched "
                               "one with scripts/build_baseline.sh")
        self.n_tokens = 0

    def _call(self, op: str, **arguments: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline worker exited (code {self.process.wait()}) during {op!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"baseline worker, {op!r}: {reply['error']}")
        return reply

    def prefill(self, tokens: list[int]) -> float:
        self.n_tokens = len(tokens)
        return float(self._call("prefill", tokens=tokens)["seconds"])

    def decode(self, tokens: list[int]) -> list[float]:
        self.n_tokens += len(tokens)
        return [float(x) for x in self._call("decode", tokens=tokens)["latencies"]]

    def state(self) -> dict[str, Any]:
        return {"cells": self.n_tokens, "attended": None, "kv_bytes": None, "kv_bytes_allocated": None}

    def close(self) -> None:
        if self.process.poll() is None:
            self._call("close")
            self.process.wait(timeout=60)


def measure_length(model: str, length: int, keep: float, policies: list[str], rounds: int, prefill_rounds: int,
                   n_decode: int, threads: int, baseline_lib: Path | None,
                   progress: tqdm) -> list[dict[str, Any]]:
    """Every configuration at one context length; one row per configuration. A configuration with the head
    profile (a tiered cache) keeps ``keep`` of the prompt (``kv_keep``: the tiers are sized by it), the others
    ``keep x L`` cells; each of the former is also timed against a fresh plain cache holding as many bytes."""
    budget = max(1, int(round(keep * length)))
    n_ctx = length + n_decode * rounds + 256
    runners: dict[str, LocalRunner | BaselineRunner] = {"off": LocalRunner(model, n_ctx, threads)}
    reconstructing = [p for p in policies if policy_of(p).decodes_to_score]
    # in each round a reconstruction policy prefills right after off (its cost target is the ratio of the two)
    for policy in reconstructing + [p for p in policies if p not in reconstructing]:
        size = dict(kv_keep=keep) if uses_profile(policy) else dict(kv_budget=budget)
        runners[policy] = LocalRunner(model, report.cells_for([policy], n_ctx), threads,
                                      **eviction_arguments(policy), **size)
    if baseline_lib is not None:
        runners["baseline"] = BaselineRunner(baseline_lib, model, n_ctx, threads)
        runners["patched"] = BaselineRunner(LIB_DIR, model, n_ctx, threads, patched=True)
    runners["fresh"] = LocalRunner(model, budget + n_decode * rounds + 256, threads)
    off = runners["off"]
    assert isinstance(off, LocalRunner)
    long_prompt = filler_tokens(off.llm, length)
    short_prompt = filler_tokens(off.llm, budget, seed=1)
    continuation = filler_tokens(off.llm, n_decode * rounds + 1, seed=2)[1:]

    prefill_s: dict[str, list[float]] = {label: [] for label in runners}
    # the floor of a reconstruction in the plain cache (a tiered one reconstructs piece by piece while prefilling)
    forward_s: dict[str, list[float]] = {p: [] for p in reconstructing if not uses_profile(p)}
    for _ in range(prefill_rounds):
        # a round: the reconstruction forward alone, off, the reconstruction policy (its cost is judged on the pair
        # off and its prefill, and its floor on off and the forward: each pair back to back), the others
        for label in forward_s:
            runner = runners[label]
            assert isinstance(runner, LocalRunner)
            forward_s[label].append(runner.reconstruction_forward(long_prompt))
        for label, runner in runners.items():
            prefill_s[label].append(runner.prefill(short_prompt if label == "fresh" else long_prompt))
            progress.update()
    # a fresh plain cache with the bytes a tiered configuration holds after its compression (full-cache cells'
    # worth), prefilled once: decode speed is what bytes buy
    off_state = off.state()
    bytes_per_cell = off_state["kv_bytes"] / off_state["cells"]
    equal_bytes: dict[str, int] = {}
    matched_bytes: dict[str, int] = {}
    for policy in policies:
        if uses_profile(policy):
            matched_bytes[policy] = runners[policy].state()["kv_bytes"]
            n_equal = max(1, math.ceil(matched_bytes[policy] / bytes_per_cell))
            label = equal_bytes_label(policy)
            fresh = runners[label] = LocalRunner(model, n_equal + n_decode * rounds + 256, threads)
            prefill_s[label] = [fresh.prefill(filler_tokens(off.llm, n_equal, seed=1))]
            equal_bytes[label] = n_equal
    latencies: dict[str, list[float]] = {label: [] for label in runners}
    for r in range(rounds):
        chunk = continuation[r * n_decode:(r + 1) * n_decode]
        for label, runner in runners.items():
            latencies[label] += runner.decode(chunk)
            progress.update()

    rows = []
    for label in ["off", *policies, *(["baseline", "patched"] if baseline_lib is not None else []), "fresh",
                  *equal_bytes]:
        runner = runners[label]
        prompt_tokens = budget if label == "fresh" else equal_bytes.get(label, length)
        row: dict[str, Any] = {
            "length": length, "config": label, "prompt_tokens": prompt_tokens,
            "prefill_s": min(prefill_s[label]), "prefill_rounds_s": prefill_s[label],
            "decode_tok_s": 1.0 / statistics.median(latencies[label]), "decode_latencies_s": latencies[label],
            **runner.state(),
        }
        if label in policies:
            assert isinstance(runner, LocalRunner)
            stats = runner.llm.kv_stats()
            # the reported prefill is the fastest round: its own scoring, eviction and compaction (the forward
            # alone is also its fastest round's)
            fastest = runner.eviction_rounds[prefill_s[label].index(min(prefill_s[label]))]
            n = max(1, fastest["evictions"])  # per eviction
            row.update({part: fastest[part] / n for part in ("score_s", "evict_s", "compact_s")})
            row.update(eviction_s=(fastest["score_s"] + fastest["evict_s"] + fastest["compact_s"]) / n,
                       score_rounds_s=[r["score_s"] / max(1, r["evictions"]) for r in runner.eviction_rounds],
                       cells_before=stats["cells_before"], cells_after=stats["cells_after"])
        if label in matched_bytes:
            row["kv_bytes_compressed"] = matched_bytes[label]  # what fresh=<label> holds (decoding adds cells)
        if label in forward_s:
            row.update(reconstruction_forward_s=min(forward_s[label]), reconstruction_forward_rounds_s=forward_s[label])
        rows.append(row)
        runner.close()
    return rows


def time_scattered_removal(model: str, length: int, keep: float, threads: int) -> dict[str, Any]:
    """One ``llama_memory_seq_rm_pos`` call removing ``length - keep * length`` random cells, then compaction."""
    runner = LocalRunner(model, length + 64, threads)
    runner.prefill(filler_tokens(runner.llm, length))
    cache = runner.llm.kv_controller.engine.cache
    rng = np.random.default_rng(0)
    n_remove = length - max(1, int(round(keep * length)))
    removed = rng.choice(length - 1, size=n_remove, replace=False).astype(np.int32)
    start = time.perf_counter()
    freed = cache.remove(removed)
    remove_s = time.perf_counter() - start
    start = time.perf_counter()
    cache.compact()
    compact_s = time.perf_counter() - start
    runner.close()
    return {"length": length, "cells": int(n_remove), "freed": int(freed), "remove_s": remove_s,
            "compact_s": compact_s}


DECODE_EVICTION_CELLS = 4096
DECODE_EVICTION_SIZES = (1, 16, 64)
TRACKING_CELLS = (1024, 2048, 4096)
MAX_TRACKING_SHARE = 0.05  # a decode-time policy's per-step tracking / a decode step without it, at 2048 cells
TRACKING_TARGET_CELLS = 2048


def time_decode_tracking(model: str, policies: list[str], cell_counts: list[int], n_decode: int, rounds: int,
                         threads: int) -> dict[str, Any]:
    """What following every decoded token costs a policy that observes decoding (H2O, TOVA, LazyEviction): at each
    cell count, single-token decode latencies with the policy tracking (its budget above the cells: no eviction)
    and with eviction off, the configurations taking turns token by token, so that the host's drift reaches all
    of them alike; the overhead is the median over the steps of a step's latency over off's at the same step.
    The policy's own state updates (``kv_stats()["observe_s"]``) are apart from the attention tap's share (the
    rest of the difference)."""
    rows = []
    for n_cells in cell_counts:
        n_ctx = n_cells + n_decode * rounds + 256
        runners = {"off": LocalRunner(model, n_ctx, threads)}
        for policy in policies:
            runners[policy] = LocalRunner(model, n_ctx, threads, kv_eviction=policy, kv_budget=n_ctx - 1)
        prompt = filler_tokens(runners["off"].llm, n_cells)
        continuation = filler_tokens(runners["off"].llm, n_decode * rounds + 1, seed=2)[1:]
        latencies: dict[str, list[float]] = {label: [] for label in runners}
        observe_s: dict[str, float] = {}
        for label, runner in runners.items():
            runner.llm.reset()
            runner.llm.eval(prompt)  # no prompt pending: decoded (and observed) without a prompt eviction
            observe_s[label] = runner.llm.kv_stats()["observe_s"]
        for token in continuation[:n_decode * rounds]:
            for label, runner in runners.items():
                latencies[label] += runner.decode([token])
        for label, runner in runners.items():
            stats = runner.llm.kv_stats()
            if label != "off" and stats["evictions"]:
                raise RuntimeError(f"{label} evicted while its tracking was timed")
            step = statistics.median(latencies[label])
            observe_step = (stats["observe_s"] - observe_s[label]) / (n_decode * rounds)
            paired = statistics.median(ours / off for ours, off in zip(latencies[label], latencies["off"]))
            rows.append({"cells": n_cells, "config": label, "step_s": step, "decode_tok_s": 1.0 / step,
                         "observe_step_s": observe_step if label != "off" else None,
                         "overhead_vs_off": paired - 1.0})
            runner.close()
    return {"cells": cell_counts, "policies": policies, "rows": rows}


def time_decode_eviction(model: str, threads: int, n_cells: int = DECODE_EVICTION_CELLS,
                         sizes: tuple[int, ...] = DECODE_EVICTION_SIZES, repeats: int = 5) -> dict[str, Any]:
    """One token-level eviction of a few cells at ``n_cells`` cells (the engine's selection and batched removal),
    leaving holes, then the decode steps that refill them; the same eviction with a compaction after it. Medians
    over ``repeats``."""
    # a policy whose budget is never reached: the cache counts cells, not positions, and nothing else evicts
    runner = LocalRunner(model, n_cells + 2 * max(sizes) + 64, threads, kv_eviction="streaming", kv_budget=n_cells)
    llm = runner.llm
    llm.eval(filler_tokens(llm, n_cells))
    engine = llm.kv_controller.engine
    rng = np.random.default_rng(0)
    refill = filler_tokens(llm, max(sizes) + 1, seed=1)[1:]
    out: dict[str, Any] = {"cells": n_cells, "rows": []}
    for size in sizes:
        timings: dict[str, list[float]] = {"holes_s": [], "compacted_s": [], "decode_step_s": []}
        for _ in range(repeats):
            for compact in (False, True):
                positions = engine.cache.positions()
                protect = np.zeros(positions.size, dtype=bool)
                protect[-1] = True
                scores = rng.random(positions.size).astype(np.float32)
                start = time.perf_counter()
                engine.evict(positions, scores, positions.size - size, protect, compact=compact)
                timings["compacted_s" if compact else "holes_s"].append(time.perf_counter() - start)
                timings["decode_step_s"] += runner.decode(refill[:size])  # refills the holes (or the freed tail)
        row = {"evicted": size, **{key: statistics.median(values) for key, values in timings.items()},
               "attended_after_refill": engine.cache.n_attended()}
        out["rows"].append(row)
    runner.close()
    return out


def equal_bytes_label(policy: str) -> str:
    """The fresh plain cache that holds the bytes a tiered configuration holds after compression."""
    return f"fresh={policy}"


def paired_ratios(numerator_s: list[float], denominator_s: list[float]) -> list[float]:
    """Round by round, one time over the other taken in the same round."""
    return [a / b for a, b in zip(numerator_s, denominator_s, strict=True)]


def ratios(rows: list[dict[str, Any]], policies: list[str]) -> list[dict[str, Any]]:
    """Per length: the patched library vs the unpatched one (same harness) and kvgguf's off vs plain llama_cpp on
    the patched library, and per policy its eviction cost and decode speed-up."""
    out = []
    for length in sorted({row["length"] for row in rows}):
        at = {row["config"]: row for row in rows if row["length"] == length}
        entry: dict[str, Any] = {"length": length}
        if "baseline" in at:
            entry["patched_vs_baseline_prefill"] = at["patched"]["prefill_s"] / at["baseline"]["prefill_s"]
            entry["patched_vs_baseline_decode"] = at["patched"]["decode_tok_s"] / at["baseline"]["decode_tok_s"]
            entry["off_vs_patched_prefill"] = at["off"]["prefill_s"] / at["patched"]["prefill_s"]
            entry["off_vs_patched_decode"] = at["off"]["decode_tok_s"] / at["patched"]["decode_tok_s"]
        off_rounds = at["off"]["prefill_rounds_s"]
        for policy in policies:
            rounds = paired_ratios(at[policy]["prefill_rounds_s"], off_rounds)
            entry[policy] = {
                "prefill_ratio": statistics.median(rounds), "prefill_ratio_rounds": rounds,
                "eviction_share_of_prefill": at[policy]["eviction_s"] / at["off"]["prefill_s"],
                "decode_vs_fresh": at[policy]["decode_tok_s"] / at["fresh"]["decode_tok_s"],
                "decode_vs_full": at[policy]["decode_tok_s"] / at["off"]["decode_tok_s"],
            }
            if uses_profile(policy):
                entry[policy].update(
                    kv_bytes_vs_full=at[policy]["kv_bytes"] / at["off"]["kv_bytes"],
                    allocated_vs_full=at[policy]["kv_bytes_allocated"] / at["off"]["kv_bytes_allocated"],
                    decode_vs_equal_bytes=(at[policy]["decode_tok_s"] /
                                           at[equal_bytes_label(policy)]["decode_tok_s"]))
            if "reconstruction_forward_s" in at[policy]:
                # the floor of a reconstruction method: a plain prefill, then the reconstruction forward alone
                floor = [1.0 + r for r in paired_ratios(at[policy]["reconstruction_forward_rounds_s"], off_rounds)]
                entry[policy]["prefill_plus_forward_ratio"] = statistics.median(floor)
                entry[policy]["prefill_plus_forward_ratio_rounds"] = floor
        out.append(entry)
    return out


def targets(summary: list[dict[str, Any]], removal: dict[str, Any], policies: list[str]) -> dict[str, bool]:
    longest = summary[-1]
    met = {f"{p}: compressed decode >= {MIN_DECODE_VS_FRESH} x fresh at {longest['length']}":
           longest[p]["decode_vs_fresh"] >= MIN_DECODE_VS_FRESH for p in policies if not uses_profile(p)}
    for p in policies:
        if uses_profile(p):
            # a tiered cache holds fewer bytes than cells x a plain cell: it must decode as fast as those bytes
            met[f"{p}: compressed decode >= {MIN_DECODE_VS_FRESH} x a fresh cache of equal bytes at "
                f"{longest['length']}"] = longest[p]["decode_vs_equal_bytes"] >= MIN_DECODE_VS_FRESH
        # the most a compression may cost against a plain prefill: a reconstruction (the tap must add little
        # to it), or the head profile alone (about a prefill); else the scoring's share of the prefill
        if policy_of(p).uses_lookahead:
            at = next((e for e in summary if e["length"] == LOOKAHEAD_SHARE_LENGTH), longest)
            met[f"{p}: scoring + eviction <= {LOOKAHEAD_MAX_EVICTION_SHARE:.0%} of prefill at {at['length']}"] = (
                at[p]["eviction_share_of_prefill"] <= LOOKAHEAD_MAX_EVICTION_SHARE)
            continue
        max_ratio = KVZIP_MAX_PREFILL_RATIO if policy_of(p).decodes_to_score else (
            PROFILE_ONLY_MAX_PREFILL_RATIO if uses_profile(p) else None)
        if max_ratio is not None:
            met[f"{p}: compression <= {max_ratio}x plain prefill at every length"] = all(
                entry[p]["prefill_ratio"] <= max_ratio for entry in summary)
        else:
            met[f"{p}: scoring + eviction <= {MAX_EVICTION_SHARE:.0%} of prefill at {longest['length']}"] = (
                longest[p]["eviction_share_of_prefill"] <= MAX_EVICTION_SHARE)
    met[f"remove {removal['cells']} scattered cells of {removal['length']} <= 2 ms"] = removal["remove_s"] <= 0.002
    if "patched_vs_baseline_prefill" in longest:
        # the patches add no work when eviction is off: no slower than the unpatched build, within machine noise
        # (patch 0005 makes prefill faster, so a lower time ratio is not noise)
        met[f"patched vs unpatched library, eviction off: prefill and decode at most {OFF_SLOWDOWN_NOISE:.0%} "
            "slower"] = all(
            entry["patched_vs_baseline_prefill"] <= 1.0 + OFF_SLOWDOWN_NOISE and
            entry["patched_vs_baseline_decode"] >= 1.0 - OFF_SLOWDOWN_NOISE for entry in summary)
    return met


def run(model: str, lengths: list[int], keep: float, policies: list[str], rounds: int, prefill_rounds: int,
        n_decode: int, threads: int, baseline_lib: Path | None,
        decode_eviction_cells: int = DECODE_EVICTION_CELLS, tracking: list[str] | None = None,
        tracking_cells: list[int] | None = None) -> dict[str, Any]:
    n_configs = len(policies) + 2 + 2 * (baseline_lib is not None)
    n_equal_bytes = sum(map(uses_profile, policies))  # decoded only
    progress = tqdm(total=len(lengths) * (n_configs * (rounds + prefill_rounds) + n_equal_bytes * rounds),
                    desc="bench speed", unit="step")
    rows = []
    for length in lengths:
        rows += measure_length(model, length, keep, policies, rounds, prefill_rounds, n_decode, threads,
                               baseline_lib, progress)
    progress.close()
    removal = time_scattered_removal(model, max(lengths), keep, threads)
    decode_eviction = time_decode_eviction(model, threads, decode_eviction_cells)
    summary = ratios(rows, policies)
    results = {"lengths": lengths, "keep": keep, "policies": policies, "rounds": rounds,
               "prefill_rounds": prefill_rounds, "n_decode_per_round": n_decode,
               "baseline_library": str(baseline_lib) if baseline_lib else None, "rows": rows, "ratios": summary,
               "remove_scattered": removal, "decode_eviction": decode_eviction,
               "targets": targets(summary, removal, policies)}
    if tracking:
        results["decode_tracking"] = time_decode_tracking(model, tracking, tracking_cells or list(TRACKING_CELLS),
                                                          n_decode, rounds, threads)
        at = [row for row in results["decode_tracking"]["rows"] if row["cells"] == TRACKING_TARGET_CELLS]
        for row in at:
            if row["config"] != "off":
                results["targets"][f"{row['config']}: tracking <= {MAX_TRACKING_SHARE:.0%} of a decode step at "
                                   f"{TRACKING_TARGET_CELLS} cells"] = row["overhead_vs_off"] <= MAX_TRACKING_SHARE
    return results


def markdown(results: dict[str, Any], env: dict[str, Any]) -> str:
    keep = results["keep"]
    lines = [
        "# kvgguf bench speed", "",
        f"`{env['command']}` — commit `{env['commit']}`, {env['cpu']}, {env['threads']} threads, "
        f"OMP_WAIT_POLICY={env['omp_wait_policy']}, load average {env['load_average']} at start, "
        f"{env.get('load_average_end')} at end.", "",
        f"Policies compress an L-token prompt to kv_keep = {keep} (a budget of keep x L cells). `off`: kvgguf's "
        "patched library with eviction off; `baseline`: the same pinned llama.cpp without the patches, and "
        "`patched`: kvgguf's library, both through plain llama_cpp.Llama in a worker process of their own"
        + ("" if results["baseline_library"] else " (not run: build the baseline with scripts/build_baseline.sh)")
        + f"; `fresh`: a new keep x L prompt. Prefill: minimum of {results['prefill_rounds']} rounds; decode: "
        f"median of {results['rounds']} interleaved rounds x {results['n_decode_per_round']} single-token evals. "
        "A policy's prefill ratio is the median over the rounds of its prefill / off's prefill in the same round "
        "(KVzip runs right after off in each round).", "",
        "| L | config | prompt | cells after | attention window | prefill s | scoring + eviction + compaction ms "
        "| decode tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        eviction = (f"{1000 * row['eviction_s']:.1f} ({1000 * row['score_s']:.1f} + {1000 * row['evict_s']:.1f} + "
                    f"{1000 * row['compact_s']:.1f})" if "eviction_s" in row else "")
        lines.append(f"| {row['length']} | {row['config']} | {row['prompt_tokens']} | {row['cells']} | "
                     f"{row['attended'] if row['attended'] is not None else ''} | {row['prefill_s']:.2f} | "
                     f"{eviction} | {row['decode_tok_s']:.1f} |")
    lines += ["", "Ratios (same run):", ""]
    header = ("| L | patched / unpatched prefill time | patched / unpatched decode speed | off / patched prefill time "
              "| off / patched decode speed |")
    sep = "|---|---|---|---|---|"
    first = results["ratios"][0]
    for policy in results["policies"]:
        header += (f" {policy}: prefill ratio | {policy}: eviction % of prefill | {policy}: decode vs fresh | "
                   f"{policy}: decode vs full |")
        sep += "---|---|---|---|"
        if "prefill_plus_forward_ratio" in first[policy]:
            header += f" {policy}: prefill + reconstruction forward alone |"
            sep += "---|"
    lines += [header, sep]
    for entry in results["ratios"]:
        line = f"| {entry['length']} |" + "".join(
            f" {entry.get(key, float('nan')):.3f} |" for key in ("patched_vs_baseline_prefill",
                                                                 "patched_vs_baseline_decode",
                                                                 "off_vs_patched_prefill", "off_vs_patched_decode"))
        for policy in results["policies"]:
            p = entry[policy]
            line += (f" {p['prefill_ratio']:.2f}x | {100 * p['eviction_share_of_prefill']:.2f}% | "
                     f"{p['decode_vs_fresh']:.3f} | "
                     f"{p['decode_vs_full']:.2f}x |")
            if "prefill_plus_forward_ratio" in first[policy]:
                line += f" {p['prefill_plus_forward_ratio']:.2f}x |"
        lines.append(line)
    tiered = [policy for policy in results["policies"] if uses_profile(policy)]
    if tiered:
        lines += ["", "With the head profile (a tiered cache, kv_keep = keep): KV bytes the compressed cells hold and "
                  "the bytes allocated, against `off`'s full cache of the same prompt; decode speed against "
                  "`fresh=<config>`, a fresh plain cache holding as many bytes:", "",
                  "| L | config | tier cells | KV bytes held / full | allocated / full | decode vs fresh of equal "
                  "bytes | prefill ratio |", "|---|---|---|---|---|---|---|"]
        for entry in results["ratios"]:
            for policy in tiered:
                p = entry[policy]
                row = next(r for r in results["rows"] if r["length"] == entry["length"] and r["config"] == policy)
                lines.append(f"| {entry['length']} | {policy} | {row.get('tier_cells', '')} | "
                             f"{p['kv_bytes_vs_full']:.3f} | {p['allocated_vs_full']:.3f} | "
                             f"{p['decode_vs_equal_bytes']:.3f} | {p['prefill_ratio']:.2f}x |")
    removal = results["remove_scattered"]
    lines += ["", f"Removing {removal['cells']} scattered cells of {removal['length']} in one call: "
              f"{1000 * removal['remove_s']:.2f} ms; compaction after it {1000 * removal['compact_s']:.1f} ms.", ""]
    if "decode_eviction" in results:
        eviction = results["decode_eviction"]
        lines += [f"A decode-time eviction of a few cells at {eviction['cells']} cells (selection + batched removal; "
                  "`kv_evict_every` leaves the holes for the next tokens), beside the same eviction compacted, and "
                  "a decode step:", "", "| cells evicted | holes left | compacted | decode step |", "|---|---|---|---|"]
        lines += [f"| {row['evicted']} | {1000 * row['holes_s']:.2f} ms | {1000 * row['compacted_s']:.1f} ms | "
                  f"{1000 * row['decode_step_s']:.1f} ms |" for row in eviction["rows"]]
        lines.append("")
    if "decode_tracking" in results:
        tracking = results["decode_tracking"]
        lines += ["Following every decoded token (policies that observe decoding, no eviction: the budget is above "
                  "the cells), against eviction off at the same cells; single-token decode steps, the "
                  "configurations taking turns token by token. `decode step` is a configuration's median; `vs off` "
                  "the median over the steps of its step over off's at the same step. `state update` is the "
                  "policy's own per-step work (`observe_step`), the rest of the difference is the attention "
                  "tap's:", "",
                  "| cells | config | decode step | decode tok/s | vs off | state update per step |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {row['cells']} | {row['config']} | {1000 * row['step_s']:.1f} ms | {row['decode_tok_s']:.1f} | "
                  f"{row['overhead_vs_off']:+.1%} | "
                  + (f"{1000 * row['observe_step_s']:.2f} ms |" if row["observe_step_s"] is not None else "|")
                  for row in tracking["rows"]]
        lines.append("")
    lines += ["| target | met |", "|---|---|"]
    lines += [f"| {name} | {met} |" for name, met in results["targets"].items()]
    lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    plt = report.pyplot()
    fig, (ax_decode, ax_prefill) = plt.subplots(1, 2, figsize=(10, 3.8))
    configs = list(dict.fromkeys(row["config"] for row in results["rows"]))
    for config in configs:
        rows = [row for row in results["rows"] if row["config"] == config]
        lengths = [row["length"] for row in rows]
        label = f"{config} (keep {results['keep']})" if config in results["policies"] else config
        fresh = config.partition("=")[0] == "fresh"
        style = "--" if fresh or config in ("baseline", "patched") else "-"
        ax_decode.plot(lengths, [row["decode_tok_s"] for row in rows], marker="o", linestyle=style, label=label)
        if not fresh:
            ax_prefill.plot(lengths, [row["prefill_s"] for row in rows], marker="o", linestyle=style, label=label)
    ax_decode.set_title("decode speed vs prompt length")
    ax_decode.set_ylabel("tokens / s")
    ax_prefill.set_title("prefill time (with scoring + eviction)")
    ax_prefill.set_ylabel("seconds")
    for ax in (ax_decode, ax_prefill):
        ax.set_xlabel("prompt tokens (L)")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    return report.save_figure(fig, path)


def main(args: argparse.Namespace) -> int:
    profile = QUICK if args.quick else FULL
    model = str(resolve_model(args.model))
    for policy in args.policies:
        check_spec(policy, args.keep)  # a bad name or ratio fails here, naming it, before any loading
    for policy in args.tracking:
        check_spec(policy, args.keep)
        if not policy_of(policy).observes_decode:
            raise ValueError(f"--tracking {policy!r}: not a policy that observes decoding "
                             f"({sorted(name for name, cls in POLICIES.items() if cls.observes_decode)})")
    baseline_lib: Path | None = None
    if not args.no_baseline:
        baseline_lib = Path(args.baseline_lib) if args.baseline_lib else DEFAULT_BASELINE_LIB
        if not (baseline_lib / "libllama.so").exists() and not (baseline_lib / "libllama.dylib").exists():
            logger.warning("no unpatched baseline in %s (build it with scripts/build_baseline.sh); measuring "
                           "without it", baseline_lib)
            baseline_lib = None
    env = report.environment(args.threads)
    results = run(model, args.lengths or profile["lengths"], args.keep, args.policies,
                  args.rounds or profile["rounds"], args.prefill_rounds or profile["prefill_rounds"], args.n_decode,
                  args.threads, baseline_lib, args.decode_eviction_cells, args.tracking, args.tracking_cells)
    results.update(model=Path(model).name, profile="quick" if args.quick else "full", environment=env)
    report.publish("speed", results, lambda: markdown(results, env), lambda path: plot(results, path),
                   Path(args.output), args.threads)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report.add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="lengths 1K and 4K, fewer rounds")
    parser.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",")],
                        help="prompt lengths in tokens, comma-separated (default 2048,4096,8192)")
    parser.add_argument("--keep", type=float, default=0.25, help="kv_keep of the policies (budget = keep x L)")
    parser.add_argument("--policies", type=lambda t: t.split(","), default=["snapkv", "streaming", "kvzip"],
                        help="policies, comma-separated; '@head' / '@token' set the granularity, '+profile' evicts "
                        "with the model's head profile in a tiered cache (kvzip+profile; kvzip-head needs it)")
    parser.add_argument("--n-decode", type=int, default=32, help="decoded tokens per configuration and round")
    parser.add_argument("--rounds", type=int, help="interleaved decode rounds")
    parser.add_argument("--prefill-rounds", type=int, help="prefills per configuration (the minimum is reported)")
    parser.add_argument("--decode-eviction-cells", type=int, default=DECODE_EVICTION_CELLS,
                        help="cells at which one decode-time eviction of a few cells is timed")
    parser.add_argument("--tracking", type=lambda t: t.split(","), default=[],
                        help="policies that observe decoding (h2o, tova, lazy), comma-separated: also time what "
                        "following every decoded token costs them against eviction off")
    parser.add_argument("--tracking-cells", type=lambda t: [int(x) for x in t.split(",")],
                        help="cell counts for --tracking (default 1024,2048,4096)")
    parser.add_argument("--baseline-lib", help="directory of the unpatched libllama (default: where "
                        "scripts/build_baseline.sh puts it)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the library comparison (the unpatched and the patched "
                        "library in worker processes)")
