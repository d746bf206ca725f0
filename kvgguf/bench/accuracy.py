"""``kvgguf bench accuracy``: accuracy of each policy x kept ratio x task x length, in two settings.

- query-aware: the question is part of the prompt when the cache is compressed;
- query-agnostic: the context is compressed first and the question asked afterwards (KVzip's setting).

Both settings run the same tokens through the same generation loop (greedy); only the place of the eviction
differs. kv_keep = 1.0 is the full cache (no eviction) and is run once per sample.
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from tqdm import tqdm

from ..chat import greedy_tokens
from ..contexts import KVSnapshot
from ..llama import Llama
from ..models import resolve_model
from ..policies import POLICIES
from ..settings import DEFAULT_WINDOW
from . import report, schema
from .specs import check_spec, eviction_arguments, policy_spec, uses_profile
from .tasks import TASKS, Sample, generate, score


SETTINGS = ("query-aware", "query-agnostic")
QUICK = dict(lengths=[1024], samples=2, keeps=[1.0, 0.5, 0.2])
FULL = dict(lengths=[1024, 2048, 4096], samples=5, keeps=[1.0, 0.5, 0.3, 0.2, 0.1])


@dataclass
class PromptTokens:
    context: list[int]    # chat template + context: what a query-agnostic policy compresses
    question: list[int]   # question + assistant header: decoded after the compression


def split_prompt(llm: Llama, formatter: Jinja2ChatFormatter, sample: Sample) -> PromptTokens:
    """The chat-formatted prompt, tokenized in two parts at the end of the context."""
    prompt = formatter(messages=[{"role": "user", "content": sample.prompt()}]).prompt
    end = prompt.index(sample.context) + len(sample.context)
    return PromptTokens(context=llm.tokenize(prompt[:end].encode(), add_bos=False, special=True),
                        question=llm.tokenize(prompt[end:].encode(), add_bos=False, special=True))


def answer(llm: Llama, tokens: PromptTokens, setting: str, max_tokens: int,
           prefix: tuple[int, KVSnapshot] | None = None) -> str:
    """Greedy answer; the eviction (if any) happens after the context or after the question.

    ``prefix``: (n, snapshot of the full cache after the first n context tokens), to start from instead of
    decoding those tokens again; n must leave the policy's observation window to decode."""
    n_done = 0
    if prefix is not None:
        n_done, snapshot = prefix
        llm.kv_restore(snapshot)
    if setting == "query-aware":
        llm.prefill((tokens.context + tokens.question)[n_done:], reset=prefix is None)
        rest: list[int] = []
    else:
        llm.prefill(tokens.context[n_done:], reset=prefix is None)
        rest = tokens.question
    out = list(itertools.islice(greedy_tokens(llm, rest, reset=False), max_tokens))
    return llm.detokenize(out).decode("utf-8", errors="ignore")


def shared_prefix(llm: Llama, tokens: PromptTokens, window: int) -> tuple[int, KVSnapshot] | None:
    """Decode the context without its last ``window`` tokens once, into the full cache, and snapshot it: every
    configuration and setting starts from there (the policies' observers are the tokens after it)."""
    n = len(tokens.context) - window
    if n <= 0:
        return None
    llm.configure_kv_eviction(None)
    llm.prefill(tokens.context[:n])
    return n, llm.kv_snapshot()


def prepare(llm: Llama, tasks: list[str], lengths: list[int], samples: int,
            first_seed: int = 0) -> list[tuple[Sample, PromptTokens]]:
    """Every (task, length, seed) sample, seeds ``first_seed`` .. ``first_seed + samples - 1``, with its
    chat-formatted tokens: the same for every configuration."""
    formatter = llm.chat_formatter()
    count = lambda text: len(llm.tokenize(text.encode(), add_bos=False))  # noqa: E731
    jobs = []
    for task, length, seed in itertools.product(tasks, lengths, range(first_seed, first_seed + samples)):
        sample = generate(task, length, seed, count)
        jobs.append((sample, split_prompt(llm, formatter, sample)))
    return jobs


def run(llm: Llama, jobs: list[tuple[Sample, PromptTokens]], keeps: list[float], policies: list[str],
        settings: list[str], max_tokens: int = 32) -> list[dict[str, Any]]:
    """One row per job x (policy, keep) x setting. The full cache (keep 1.0) is answered once per job: both
    settings decode the same tokens into the same cache, so its row is recorded for each setting."""
    configs = [("full", 1.0)] if 1.0 in keeps else []
    configs += [(policy, keep) for policy, keep in itertools.product(policies, keeps) if keep < 1.0]
    n_answers = sum(1 if policy == "full" else len(settings) for policy, _ in configs)
    rows = []
    progress = tqdm(total=len(jobs) * n_answers, desc="bench accuracy", unit="answer")
    for sample, tokens in jobs:
        prefix = shared_prefix(llm, tokens, DEFAULT_WINDOW)
        for policy, keep in configs:
            if policy == "full":
                llm.configure_kv_eviction(None)
            else:
                llm.configure_kv_eviction(kv_keep=keep, **eviction_arguments(policy))
            for setting in settings[:1] if policy == "full" else settings:
                # the shared prefix is a plain cache's state: a tiered configuration prefills from the start
                output = answer(llm, tokens, setting, max_tokens, None if uses_profile(policy) else prefix)
                stats = llm.kv_stats()
                progress.update()
                for recorded in settings if policy == "full" else [setting]:
                    rows.append({"task": sample.task, "length": sample.n_tokens_target, "seed": sample.seed,
                                 "policy": policy, "keep": keep, "setting": recorded,
                                 "score": score(sample, output), "output": output,
                                 "prompt_tokens": len(tokens.context) + len(tokens.question),
                                 "cells_after_eviction": stats["cells_after"] if policy != "full" else None})
    progress.close()
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean score and sample count per (setting, policy, keep, task, length)."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        key = (row["setting"], row["policy"], row["keep"], row["task"], row["length"])
        groups.setdefault(key, []).append(row["score"])
    return [{"setting": k[0], "policy": k[1], "keep": k[2], "task": k[3], "length": k[4],
             "accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())]


def kvpress_twin(policy: str) -> str | None:
    """kvpress's row with the same selection as our ``policy``, where the suite has one: KVzip's scores with our
    per-head or per-token selection (``kvpress:kvzip-head`` / ``-token``), its SnapKV (per head) and its
    StreamingLLM. ``kvpress:kvzip`` (its global selection over all layers and heads) is no twin of ours, nor of
    ``kvzip+profile`` (per-head budgets from the profile: ``kvpress:kvzip-profile`` is its unquantized twin;
    ``kvzip+tiersT``'s is ``kvpress:kvzip-tiersT``, the same budgets grouped into T tiers)."""
    base, granularity = policy_spec(policy)
    if uses_profile(policy):
        if base != "kvzip":
            return None
        tiers = eviction_arguments(policy)["kv_tiers"]
        return f"kvpress:kvzip-tiers{tiers}" if tiers is not None else "kvpress:kvzip-profile"
    if base == "kvzip":
        return f"kvpress:kvzip-{granularity or POLICIES[base].default_granularity}"
    if base in ("snapkv", "streaming") and granularity is None:
        return f"kvpress:{base}"
    return None


def paired(rows: list[dict[str, Any]], partner_of: Callable[[str], str | None],
           resamples: int = 10_000) -> list[dict[str, Any]]:
    """Each policy against its partner (``partner_of(policy)``, None: none), answer by answer: per (setting,
    policy, keep < 1), the samples both answered (same task, length and seed), both means, the mean difference
    (policy - partner) with a 95% paired bootstrap interval (seeded: the same rows give the same interval), and how
    many answers scored differently."""
    scores = {(r["setting"], r["policy"], r["keep"], r["task"], r["length"], r["seed"]): r["score"] for r in rows}
    rng = np.random.default_rng(0)
    out = []
    configs = {(r["setting"], r["policy"], r["keep"]) for r in rows if r["keep"] < 1.0}
    for setting, policy, keep in sorted(configs, key=lambda c: (c[0], c[1], -c[2])):
        partner = partner_of(policy)
        if partner is None or partner == policy:
            continue
        pairs = [(value, scores[(setting, partner, keep) + key[3:]]) for key, value in scores.items()
                 if key[:3] == (setting, policy, keep) and (setting, partner, keep) + key[3:] in scores]
        if not pairs:
            continue
        ours, theirs = np.array(pairs, dtype=np.float64).T
        diff = ours - theirs
        means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
        low, high = np.quantile(means, [0.025, 0.975])
        out.append({"setting": setting, "policy": policy, "partner": partner, "keep": keep, "n": int(diff.size),
                    "ours": float(ours.mean()), "theirs": float(theirs.mean()), "difference": float(diff.mean()),
                    "ci95": [float(low), float(high)], "n_differ": int(np.count_nonzero(diff))})
    return out


def paired_with_kvpress(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours against kvpress's same selection (``kvpress_twin``), answer by answer (see ``paired``)."""
    return [{**{k: v for k, v in p.items() if k != "partner"}, "kvpress": p["partner"]}
            for p in paired(rows, kvpress_twin)]


def paired_with(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Every other policy of ours against ``reference`` (``--paired-against``), answer by answer (see
    ``paired``)."""
    return paired(rows, lambda policy: None if policy.startswith("kvpress:") else reference)


def paired_table(title: str, intro: str, partner_key: str, partner_header: str,
                 entries: list[dict[str, Any]], keep_header: str = "keep") -> list[str]:
    """A markdown section of ``paired`` comparisons."""
    lines = [f"## {title}", "", intro, "",
             f"| setting | policy | {partner_header} | {keep_header} | n | policy mean | {partner_header} mean | "
             "difference | 95% interval | differ |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['setting']} | {p['policy']} | {p[partner_key]} | {p['keep']} | {p['n']} | {p['ours']:.3f} | "
              f"{p['theirs']:.3f} | {p['difference']:+.3f} | [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] | "
              f"{p['n_differ']} |" for p in entries]
    return lines + [""]


def markdown(summary: list[dict[str, Any]], env: dict[str, Any],
             correlation_summary: list[dict[str, Any]] | None = None,
             kvpress_paired: list[dict[str, Any]] | None = None,
             reference_paired: list[dict[str, Any]] | None = None) -> str:
    lines = ["# kvgguf bench accuracy", "",
             f"`{env['command']}` — commit `{env['commit']}`, {env['cpu']}, {env['threads']} threads.", "",
             "Accuracy (fraction of expected answers found, greedy decoding), n = samples per cell. kv_keep is the "
             "fraction of the prompt's evictable cells kept (kvpress's compression_ratio = 1 - kv_keep); 1.0 is "
             "the full cache. `mean` is the unweighted mean over the tasks of the row.", ""]
    if env.get("parts"):
        lines += ["Merged from runs of disjoint seeds:", ""]
        lines += [f"- `{part['command']}` — commit `{part['commit']}`, {part['date']}" for part in env["parts"]]
        lines.append("")
    if any(s["policy"].startswith("kvpress:") for s in summary):
        lines += ["Rows `kvpress:<press>` are kvpress's presses on the same model (transformers, weights "
                  "dequantized from the same GGUF file) and the same token ids, at the same kv_keep. kvpress does "
                  "not free memory: it prunes a PyTorch cache (or masks it); our policies evict cells from "
                  "llama.cpp's cache.", ""]
    tasks = sorted({s["task"] for s in summary})
    for setting in SETTINGS:
        part = [s for s in summary if s["setting"] == setting]
        if not part:
            continue
        lines += [f"## {setting}", "", "| policy | keep | length | " + " | ".join(tasks) + " | mean |",
                  "|---|---|---|" + "---|" * (len(tasks) + 1)]
        keys = sorted({(s["policy"], s["keep"], s["length"]) for s in part},
                      key=lambda k: (k[0] != "full", k[0].startswith("kvpress:"), k[0], -k[1], k[2]))
        for policy, keep, length in keys:
            cells, values = [], []
            for task in tasks:
                hit = [s for s in part if (s["policy"], s["keep"], s["length"], s["task"]) == (policy, keep, length,
                                                                                                 task)]
                cells.append(f"{hit[0]['accuracy']:.2f} (n={hit[0]['n']})" if hit else "—")
                values += [hit[0]["accuracy"]] if hit else []
            lines.append(f"| {policy} | {keep} | {length} | " + " | ".join(cells) +
                         f" | {sum(values) / len(values):.2f} |")
        lines.append("")
    if kvpress_paired:
        lines += paired_table("Beside kvpress's same selection, answer by answer",
                              "Each of our answers against kvpress's on the same sample (task, length, seed), "
                              "pooled over the tasks: means, their difference (ours - kvpress) with a 95% paired "
                              "bootstrap interval, and the number of answers that scored differently.",
                              "kvpress", "kvpress", kvpress_paired)
    if reference_paired:
        reference = reference_paired[0]["partner"]
        lines += paired_table(f"Beside {reference}, answer by answer",
                              f"Each policy's answers against {reference}'s on the same samples (task, length, "
                              f"seed), pooled over the tasks: means, their difference (policy - {reference}) with "
                              "a 95% paired bootstrap interval, and the number of answers that scored "
                              "differently.", "partner", "reference", reference_paired)
    if correlation_summary:
        lines += ["## Score rank correlation with kvpress", "",
                  "Spearman correlation between our per-cell scores and kvpress's for the same prompt (the first "
                  "sample, question included), per (layer, KV head), over the cells neither side protects.", "",
                  "| method | pairs | mean | median | min | share >= 0.9 |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['method']} | {c['n_pairs']} | {c['mean']:.3f} | {c['median']:.3f} | {c['min']:.3f} | "
                  f"{c['frac_ge_0_9']:.2f} |" for c in correlation_summary]
        lines.append("")
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path) -> Path:
    plt = report.pyplot()
    tasks = sorted({s["task"] for s in summary})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        part = [s for s in summary if s["task"] == task]
        full = [s["accuracy"] for s in part if s["policy"] == "full"]
        for setting, policy in sorted({(s["setting"], s["policy"]) for s in part if s["policy"] != "full"}):
            # the full cache is every policy's kv_keep = 1.0 point
            points = sorted((s["keep"], s["accuracy"]) for s in part
                            if s["setting"] == setting and s["policy"] in (policy, "full"))
            keeps = [k for k, _ in points]
            means = [sum(a for k2, a in points if k2 == k) / sum(1 for k2, _ in points if k2 == k) for k in keeps]
            ax.plot(keeps, means, marker="o", linestyle="-" if setting == "query-aware" else "--",
                    label=f"{policy} ({setting})")
        if full:
            ax.axhline(sum(full) / len(full), color="gray", linewidth=1, label="full cache")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("kv_keep")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7)
    return report.save_figure(fig, path)


def main(args: argparse.Namespace) -> int:
    profile = QUICK if args.quick else FULL
    model = str(resolve_model(args.model))
    env = report.environment(args.threads)
    lengths = args.lengths or profile["lengths"]
    keeps = args.keeps or profile["keeps"]
    samples = args.samples or profile["samples"]
    check_arguments(args.tasks, args.policies, keeps, args.settings, lengths, args.paired_against)
    llm = Llama(model, n_ctx=report.cells_for(args.policies, max(lengths) + 256),
                n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    jobs = prepare(llm, args.tasks, lengths, samples, args.first_seed)
    rows = run(llm, jobs, keeps, args.policies, args.settings)
    results: dict[str, Any] = {"model": Path(model).name, "profile": "quick" if args.quick else "full",
                               "lengths": lengths, "keeps": keeps, "samples": samples,
                               "first_seed": args.first_seed}
    if args.compare == "kvpress":
        rows += compare_kvpress(model, llm, jobs, keeps, args.kvpress_methods, args.settings, args.threads, results)
    llm.close()
    results.update(summary=summarize(rows), rows=rows, environment=env)
    if args.compare == "kvpress":
        results["kvpress_paired"] = paired_with_kvpress(rows)
    if args.paired_against is not None:
        results.update(paired_against=args.paired_against, paired=paired_with(rows, args.paired_against))
    publish(results, Path(args.output))
    return 0


def publish(results: dict[str, Any], output: Path) -> list[Path]:
    """Write a result (a run's or a merge's) as accuracy.json, .md and .png into ``output``."""
    env = results["environment"]
    return report.publish("accuracy", results,
                          lambda: markdown(results["summary"], env, results.get("correlation_summary"),
                                           results.get("kvpress_paired"), results.get("paired")),
                          lambda path: plot(results["summary"], path), output, env["threads"])


ROW_KEY = ("setting", "policy", "keep", "task", "length", "seed")


def merge(parts: list[dict[str, Any]], names: list[str], reference: str | None = None) -> dict[str, Any]:
    """One result from ``bench accuracy`` results of the same configuration over disjoint seeds (``names`` label
    the parts in errors): the rows of all, the summary and the paired comparisons recomputed over them (against
    ``reference`` too, or the parts' ``--paired-against``), kvpress's
    score correlations from the first part that has them. Raises ValueError naming the part that does not fit."""
    if not parts:
        raise ValueError("nothing to merge: give at least one accuracy.json")
    first = parts[0]
    configs = lambda result: {tuple(row[k] for k in ROW_KEY[:5]) for row in result["rows"]}  # noqa: E731
    first_configs = configs(first)
    seen: dict[tuple, str] = {}
    for part, name in zip(parts, names, strict=True):
        try:
            schema.check("accuracy", part)
        except ValueError as error:
            raise ValueError(f"{name} is no 'bench accuracy' result: {error}")
        for key in ("model", "lengths", "keeps"):
            if part[key] != first[key]:
                raise ValueError(f"{name}: {key} {part[key]!r} differs from {names[0]}'s {first[key]!r}")
        part_configs = configs(part)
        if part_configs != first_configs:
            extra = sorted(part_configs ^ first_configs, key=str)[0]
            raise ValueError(f"{name}: the (setting, policy, keep, task, length) {extra} is in only one of "
                             f"{name} and {names[0]}")
        for row in part["rows"]:
            key = tuple(row[k] for k in ROW_KEY)
            if key in seen:
                raise ValueError(f"{name}: seed {row['seed']} of {row['task']} at {row['length']} tokens is "
                                 f"also in {seen[key]}; merge runs of disjoint seeds (--first-seed)")
            seen[key] = name
    rows = [row for part in parts for row in part["rows"]]
    seeds = sorted({row["seed"] for row in rows})
    merged: dict[str, Any] = {key: value for key, value in first.items()
                              if key not in ("rows", "summary", "kvpress_paired", "paired", "environment")}
    for part in parts:
        if "correlation_summary" in part and "correlation_summary" not in merged:
            merged.update({key: part[key] for key in ("kvpress_version", "correlations", "correlation_summary")})
    merged.update(samples=len(seeds), first_seed=seeds[0], rows=rows, summary=summarize(rows))
    if any(row["policy"].startswith("kvpress:") for row in rows):
        merged["kvpress_paired"] = paired_with_kvpress(rows)
    reference = reference or first.get("paired_against")
    if reference is not None:
        merged.update(paired_against=reference, paired=paired_with(rows, reference))
    environment = report.environment(first["environment"]["threads"])
    environment["parts"] = [{"file": name, **{key: part["environment"].get(key) for key in
                                              ("command", "commit", "date", "load_average", "load_average_end")}}
                            for part, name in zip(parts, names, strict=True)]
    merged["environment"] = environment
    return merged


def merge_main(args: argparse.Namespace) -> int:
    """``kvgguf bench merge-accuracy``: merge accuracy.json files of disjoint seeds and write the result."""
    parts = []
    for path in args.results:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read accuracy results {path!r}: {error}")
    if args.paired_against is not None:
        check_reference(args.paired_against, sorted({row["policy"] for part in parts for row in part["rows"]}))
    publish(merge(parts, list(args.results), args.paired_against), Path(args.output))
    return 0


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", help="accuracy.json files of runs that differ only in their seeds")
    parser.add_argument("--paired-against", metavar="POLICY", help=PAIRED_HELP)
    parser.add_argument("-o", "--output", default=str(report.DEFAULT_OUTPUT), help="folder for JSON/markdown/PNG")


def compare_kvpress(model: str, llm: Llama, jobs: list[tuple[Sample, PromptTokens]], keeps: list[float],
                    methods: list[str], settings: list[str], threads: int, results: dict[str, Any]) -> list[dict]:
    """kvpress's presses on the same model (transformers, from the same GGUF file, ``threads`` torch threads) and
    the same token ids; adds the score correlations on the first job's query-aware prompt to ``results``; returns
    the answer rows."""
    try:
        from . import compare
    except ImportError as error:
        raise ValueError(f"--compare kvpress needs the [compare] extra (pip install 'kvgguf[compare]'): {error}")
    compare.torch.set_num_threads(threads)  # --threads governs both engines, as the result records
    ours = [method for method in methods if method in POLICIES]
    first = jobs[0][1]
    correlations = compare.score_correlations(model, first.context + first.question, ours, threads=threads)
    results.update(kvpress_version=compare.kvpress_version(), correlations=correlations,
                   correlation_summary=compare.summarize_correlations(correlations))
    n_answers = len(settings) * len(methods) * sum(keep < 1.0 for keep in keeps) + (1.0 in keeps)
    progress = tqdm(total=len(jobs) * n_answers, desc="kvpress", unit="answer")
    rows = compare.run_kvpress(model, [(sample, tokens.context, tokens.question) for sample, tokens in jobs],
                               methods, keeps, settings, max_tokens=32,
                               detokenize=lambda ids: llm.detokenize(ids).decode("utf-8", errors="ignore"),
                               progress=progress)
    progress.close()
    return rows


PAIRED_HELP = ("also compare every other policy with this one (one of --policies), answer by answer, with 95%% "
               "paired bootstrap intervals")


def check_reference(reference: str, policies: list[str]) -> None:
    """ValueError unless ``reference`` (--paired-against) is one of the policies run."""
    if reference not in policies:
        raise ValueError(f"--paired-against {reference!r} is not one of the policies run: {policies}")


def check_arguments(tasks: list[str], policies: list[str], keeps: list[float], settings: list[str],
                    lengths: list[int], reference: str | None = None) -> None:
    """Raise ValueError naming the first bad value, before anything is loaded."""
    if reference is not None:
        check_reference(reference, policies)
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    for setting in settings:
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; known: {list(SETTINGS)}")
    for length in lengths:
        if length < 64:
            raise ValueError(f"context length {length} is too short (at least 64 tokens)")
    for policy, keep in itertools.product(policies, keeps):
        check_spec(policy, keep)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    report.add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="1K contexts, 2 samples, keep 1.0/0.5/0.2")
    parser.add_argument("--tasks", type=lambda t: t.split(","), default=sorted(TASKS))
    parser.add_argument("--policies", type=lambda t: t.split(","), default=["snapkv", "streaming", "kvzip"],
                        help="policies, comma-separated; '@token' or '@head' sets the granularity (kvzip@token), "
                        "'+profile' evicts with the model's head profile in a tiered cache (kvzip+profile)")
    parser.add_argument("--settings", type=lambda t: t.split(","), default=list(SETTINGS))
    parser.add_argument("--lengths", type=_ints, help="context lengths in tokens, comma-separated")
    parser.add_argument("--keeps", type=_floats, help="kept ratios, comma-separated (1.0 = full cache)")
    parser.add_argument("--samples", type=int, help="samples per task and length")
    parser.add_argument("--first-seed", type=_non_negative, default=0,
                        help="seed of the first sample (seeds first .. first + samples - 1): a run can be split "
                        "into runs of disjoint seeds and their results merged with 'kvgguf bench merge-accuracy'")
    parser.add_argument("--compare", choices=["kvpress"], help="also run kvpress's presses (PyTorch, masking) on the "
                        "same model and prompts; needs the [compare] extra")
    parser.add_argument("--paired-against", metavar="POLICY", help=PAIRED_HELP)
    parser.add_argument("--kvpress-methods", type=lambda t: t.split(","), default=["snapkv", "streaming", "kvzip"],
                        help="kvpress presses to run with --compare (named like our policies)")
