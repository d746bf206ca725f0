"""The benchmark code runs end to end on tiny configurations and writes its files (no timing asserted); the JSON
layout is the one kvgguf.bench.schema describes, for fresh runs and for the results committed in docs/."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from kvgguf._native import LIB_DIR
from kvgguf.bench import schema
from kvgguf.bench.reasoning import agreement, budget_cells, extract_answer
from kvgguf.bench.speed import BaselineRunner, ratios
from kvgguf.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def test_bench_speed_writes_json_markdown_and_png(tmp_path, model_path):
    code = main(["bench", "speed", "-m", model_path, "--lengths", "300,600", "--keep", "0.5", "--n-decode", "2",
                 "--rounds", "1", "--prefill-rounds", "1", "--no-baseline", "--decode-eviction-cells", "400",
                 "--tracking", "lazy,tova", "--tracking-cells", "400", "-o", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "speed.json").read_text())
    schema.check("speed", results)
    # one decode-time eviction of 1 / 16 / 64 cells at 400 cells, its holes refilled by as many decoded tokens
    eviction = results["decode_eviction"]
    assert eviction["cells"] == 400 and [row["evicted"] for row in eviction["rows"]] == [1, 16, 64]
    assert all(row["holes_s"] > 0 and row["compacted_s"] > 0 for row in eviction["rows"])
    assert all(row["attended_after_refill"] == 512 for row in eviction["rows"])  # 400 cells, padded to 256
    rows = {(row["length"], row["config"]): row for row in results["rows"]}
    assert set(rows) == {(length, config) for length in (300, 600)
                         for config in ("off", "snapkv", "streaming", "kvzip", "fresh")}
    for length in (300, 600):
        budget = length // 2
        # the policies compressed to the budget (+ the decoded tokens), the full cache kept everything
        for policy in ("snapkv", "streaming", "kvzip"):
            assert rows[(length, policy)]["cells_before"] == length
            assert rows[(length, policy)]["cells_after"] == budget
            assert rows[(length, policy)]["cells"] == budget + 2
            assert rows[(length, policy)]["attended"] < rows[(length, "off")]["attended"]
        assert rows[(length, "off")]["cells"] == length + 2
        assert rows[(length, "fresh")]["cells"] == budget + 2
        # KVzip's floor: its reconstruction forward without the tap, timed after a plain prefill; not for the others
        assert rows[(length, "kvzip")]["reconstruction_forward_s"] > 0
        # the scoring of each prefill round (one here), the reported one inside the reported prefill
        assert len(rows[(length, "kvzip")]["score_rounds_s"]) == 1
        assert 0 < rows[(length, "kvzip")]["score_s"] < rows[(length, "kvzip")]["prefill_s"]
        assert "reconstruction_forward_s" not in rows[(length, "snapkv")]
    assert [entry["length"] for entry in results["ratios"]] == [300, 600]
    for entry in results["ratios"]:
        assert entry["kvzip"]["prefill_plus_forward_ratio"] > 1.0
        assert "prefill_plus_forward_ratio" not in entry["snapkv"]
        # one round: each policy's ratio is its prefill over off's of the same round
        at = {config: rows[(entry["length"], config)] for config in ("off", "snapkv", "kvzip")}
        for policy in ("snapkv", "kvzip"):
            assert entry[policy]["prefill_ratio_rounds"] == [entry[policy]["prefill_ratio"]]
            assert entry[policy]["prefill_ratio"] == pytest.approx(at[policy]["prefill_s"] / at["off"]["prefill_s"])
        assert entry["kvzip"]["prefill_plus_forward_ratio"] == pytest.approx(
            1.0 + at["kvzip"]["reconstruction_forward_s"] / at["off"]["prefill_s"])
    assert results["remove_scattered"]["freed"] == 300
    assert results["baseline_library"] is None
    assert results["environment"]["threads"] == 2 and "load_average" in results["environment"]
    assert os.path.getsize(tmp_path / "speed.png") > 1000
    markdown = (tmp_path / "speed.md").read_text()
    assert "decode vs fresh" in markdown and "kvzip: prefill + reconstruction forward alone" in markdown
    # what following every decoded token costs lazy and tova at 400 cells, against off (no eviction there)
    tracking = {row["config"]: row for row in results["decode_tracking"]["rows"]}
    assert set(tracking) == {"off", "lazy", "tova"} and all(row["cells"] == 400 for row in tracking.values())
    assert tracking["off"]["observe_step_s"] is None
    assert all(0 < tracking[p]["observe_step_s"] < tracking[p]["step_s"] for p in ("lazy", "tova"))
    assert "state update per step" in markdown


def test_bench_speed_tracks_only_policies_that_observe_decoding(model_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "speed", "-m", model_path, "--tracking", "snapkv"])
    assert exit_info.value.code == 2 and "--tracking 'snapkv': not a policy that observes decoding" in (
        capsys.readouterr().err)


def test_bench_speed_times_tiered_configurations_against_a_fresh_cache_of_equal_bytes(tmp_path, model_path):
    """kvzip+profile and kvzip-head compress into a tiered cache: the row records the bytes held and allocated,
    and a fresh plain cache holding as many bytes (``fresh=<config>``) is decoded beside it."""
    code = main(["bench", "speed", "-m", model_path, "--lengths", "600", "--keep", "0.3", "--n-decode", "2",
                 "--rounds", "1", "--prefill-rounds", "1", "--no-baseline", "--decode-eviction-cells", "300",
                 "--policies", "kvzip+profile,kvzip-head", "-o", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "speed.json").read_text())
    schema.check("speed", results)
    rows = {row["config"]: row for row in results["rows"]}
    assert set(rows) == {"off", "kvzip+profile", "kvzip-head", "fresh", "fresh=kvzip+profile", "fresh=kvzip-head"}
    bytes_per_cell = rows["off"]["kv_bytes"] / rows["off"]["cells"]
    (entry,) = results["ratios"]
    for policy in ("kvzip+profile", "kvzip-head"):
        row = rows[policy]
        assert len(row["tier_cells"]) >= 2  # a tiered cache
        assert row["kv_bytes"] < 0.7 * rows["off"]["kv_bytes"]  # (its full heads hold every token)
        # the fresh plain cache holds the tiers' bytes, in whole cells
        equal = rows[f"fresh={policy}"]
        assert equal["prompt_tokens"] == math.ceil(row["kv_bytes_compressed"] / bytes_per_cell)
        assert row["kv_bytes"] == row["kv_bytes_compressed"] + 2 * bytes_per_cell  # 2 decoded tokens, every head
        assert equal["cells"] == equal["prompt_tokens"] + 2
        assert entry[policy]["kv_bytes_vs_full"] == pytest.approx(row["kv_bytes"] / rows["off"]["kv_bytes"])
        assert entry[policy]["decode_vs_equal_bytes"] == pytest.approx(
            row["decode_tok_s"] / equal["decode_tok_s"])
    assert any("kvzip-head: compression <= 1.1x" in name for name in results["targets"])
    assert any("fresh cache of equal bytes" in name for name in results["targets"])
    assert "decode vs fresh of equal bytes" in (tmp_path / "speed.md").read_text()


def test_policy_ratios_pair_each_round_with_off_of_the_same_round():
    # off was slow in round 1 and kvzip in round 2: paired, the ratios are 3 and 2 (median 2.5); the ratio of the
    # minimums would read 3 / 1
    rows = [{"length": 64, "config": "off", "prefill_s": 1.0, "prefill_rounds_s": [4.0, 1.0], "decode_tok_s": 10.0},
            {"length": 64, "config": "fresh", "prefill_s": 0.5, "prefill_rounds_s": [0.5, 0.5], "decode_tok_s": 20.0},
            {"length": 64, "config": "kvzip", "prefill_s": 3.0, "prefill_rounds_s": [12.0, 3.0], "eviction_s": 1.0,
             "decode_tok_s": 20.0, "reconstruction_forward_s": 1.0, "reconstruction_forward_rounds_s": [6.0, 1.0]}]
    (entry,) = ratios(rows, ["kvzip"])
    assert entry["kvzip"]["prefill_ratio_rounds"] == [3.0, 3.0]
    rows[2]["prefill_rounds_s"] = [8.0, 3.0]
    (entry,) = ratios(rows, ["kvzip"])
    assert entry["kvzip"]["prefill_ratio_rounds"] == [2.0, 3.0] and entry["kvzip"]["prefill_ratio"] == 2.5
    assert entry["kvzip"]["prefill_plus_forward_ratio_rounds"] == [2.5, 2.0]
    assert entry["kvzip"]["prefill_plus_forward_ratio"] == 2.25


def test_baseline_worker_refuses_a_patched_library(model_path):
    # the worker process speaks its protocol, loads the model and checks which library it got: ours is patched
    with pytest.raises(RuntimeError, match="has kvgguf's patches"):
        BaselineRunner(LIB_DIR, model_path, n_ctx=256, threads=1)


def test_worker_runs_the_patched_library_like_the_baseline(model_path):
    # the library comparison drives kvgguf's own library through the same worker as the unpatched one
    runner = BaselineRunner(LIB_DIR, model_path, n_ctx=256, threads=1, patched=True)
    try:
        assert runner.prefill(list(range(100, 140))) > 0
        latencies = runner.decode([200, 201, 202])
        assert len(latencies) == 3 and all(latency > 0 for latency in latencies)
        assert runner.state() == {"cells": 43, "attended": None, "kv_bytes": None, "kv_bytes_allocated": None}
    finally:
        runner.close()


def test_bench_memory_compares_eviction_with_the_full_cache(tmp_path, model_path):
    code = main(["bench", "memory", "-m", model_path, "--n-ctx", "256", "--factor", "2", "--policies", "streaming",
                 "-o", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "memory.json").read_text())
    schema.check("memory", results)
    full, streaming = results["rows"]
    assert (full["policy"], streaming["policy"]) == ("full", "streaming")
    assert full["prompt_tokens"] == streaming["prompt_tokens"] > 2 * 256 * 0.8
    # the full cache held the whole prompt; the evicting one never more than its 256 cells
    assert full["n_ctx"] >= full["prompt_tokens"] and full["cells_end"] >= full["prompt_tokens"]
    assert streaming["n_ctx"] == 256 and streaming["cells_end"] <= 256
    assert streaming["kv_bytes_allocated"] == 256 * streaming["bytes_per_cell"]
    assert streaming["kv_allocated_vs_full"] == pytest.approx(256 / full["n_ctx"])
    assert full["peak_rss_bytes"] > full["rss_before_model_bytes"] > 0
    assert os.path.getsize(tmp_path / "memory.png") > 1000


def test_bench_accuracy_writes_a_summary_per_cell(tmp_path, model_path):
    code = main(["bench", "accuracy", "-m", model_path, "--tasks", "niah_single", "--lengths", "256",
                 "--samples", "1", "--keeps", "1.0,0.5", "--policies", "streaming", "-o", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "accuracy.json").read_text())
    schema.check("accuracy", results)
    cells = {(s["setting"], s["policy"], s["keep"]): s for s in results["summary"]}
    assert set(cells) == {(setting, policy, keep) for setting in ("query-aware", "query-agnostic")
                          for policy, keep in (("full", 1.0), ("streaming", 0.5))}
    assert all(s["n"] == 1 and 0.0 <= s["accuracy"] <= 1.0 for s in cells.values())
    # the needle at 256 tokens is found with the full cache
    assert cells[("query-aware", "full", 1.0)]["accuracy"] == 1.0
    assert cells[("query-agnostic", "full", 1.0)]["accuracy"] == 1.0
    rows = [r for r in results["rows"] if r["policy"] == "streaming"]
    assert all(r["cells_after_eviction"] < r["prompt_tokens"] for r in rows)
    assert os.path.getsize(tmp_path / "accuracy.png") > 1000


@pytest.mark.parametrize("arguments, message", [
    (["--tasks", "niah_single,nope"], "unknown task 'nope'"),
    (["--policies", "snapkv,tova2"], "unknown kv_eviction policy 'tova2'"),
    (["--policies", "snapkv+profile"], "unknown policy 'snapkv+profile'"),
    (["--policies", "kvzip+tiers9"], "kv_tiers must be <= 8, got 9"),
    (["--keeps", "1.0,1.5"], "kv_keep must be in"),
    (["--settings", "query-blind"], "unknown setting 'query-blind'"),
])
def test_bench_accuracy_rejects_bad_arguments_by_name(model_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "accuracy", "-m", model_path, *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(schema.SCHEMAS))
def test_committed_results_follow_the_schema(name):
    """Every result of ``kvgguf bench <name>`` committed under docs/benchmarks/ (at least one), with its
    markdown and plot beside it."""
    paths = sorted(DOCS.rglob(f"{name}.json"))
    assert paths, f"no committed {name}.json under {DOCS}"
    for path in paths:
        schema.check(name, json.loads(path.read_text()))
        assert path.with_suffix(".md").read_text().startswith(f"# kvgguf bench {name}")
        assert path.with_suffix(".png").stat().st_size > 1000


def test_schema_check_names_the_missing_key():
    results = {key: None for key in schema.SCHEMAS["memory"]["top"]}
    results["environment"] = {key: None for key in schema.ENVIRONMENT_KEYS}
    results["schema_version"] = schema.SCHEMA_VERSION
    results["rows"] = [{key: 0 for key in schema.SCHEMAS["memory"]["rows"] - {"peak_rss_bytes"}}]
    with pytest.raises(ValueError, match=r"memory.rows\[0\] lacks peak_rss_bytes"):
        schema.check("memory", results)


def test_paired_comparison_with_kvpress_counts_each_sample_once():
    from kvgguf.bench.accuracy import kvpress_twin, paired_with_kvpress

    assert kvpress_twin("kvzip@head") == "kvpress:kvzip-head"
    assert kvpress_twin("kvzip") == kvpress_twin("kvzip@token") == "kvpress:kvzip-token"  # kvzip's default
    assert kvpress_twin("snapkv@token") is None  # kvpress's SnapKV selects per head
    assert kvpress_twin("kvzip+profile") == "kvpress:kvzip-profile"  # the profile's budgets, unquantized
    assert kvpress_twin("kvzip+tiers2") == "kvpress:kvzip-tiers2"  # ... grouped into two tiers
    assert kvpress_twin("kvzip-head") is None  # the profile alone: no kvpress press does that

    def row(policy: str, seed: int, score: float, keep: float = 0.5) -> dict:
        return {"setting": "query-agnostic", "policy": policy, "keep": keep, "task": "niah_single",
                "length": 1024, "seed": seed, "score": score}

    ours = [1.0, 1.0, 0.0, 1.0]
    theirs = [1.0, 0.0, 0.0, 1.0]
    rows = [row("kvzip@head", seed, value) for seed, value in enumerate(ours)]
    rows += [row("kvpress:kvzip-head", seed, value) for seed, value in enumerate(theirs)]
    rows += [row("kvpress:kvzip-head", 9, 1.0), row("kvzip@head", 0, 1.0, keep=1.0)]  # unpaired, full cache: left out
    (paired,) = paired_with_kvpress(rows)
    assert (paired["policy"], paired["kvpress"], paired["n"], paired["n_differ"]) == (
        "kvzip@head", "kvpress:kvzip-head", 4, 1)
    assert paired["ours"] == 0.75 and paired["theirs"] == 0.5 and paired["difference"] == 0.25
    low, high = paired["ci95"]
    assert low == 0.0 and 0.25 < high <= 1.0  # P(no differing answer drawn) = 0.75 ** 4 > 2.5%
    assert paired_with_kvpress(rows) == [paired]  # seeded: the same rows give the same interval


def test_paired_comparison_against_a_reference_policy():
    from kvgguf.bench.accuracy import paired_with

    def row(policy: str, seed: int, score: float, keep: float = 0.2) -> dict:
        return {"setting": "query-aware", "policy": policy, "keep": keep, "task": "prose_niah", "length": 1024,
                "seed": seed, "score": score}

    rows = [row("lookahead", seed, 1.0) for seed in range(5)] + [row("snapkv", seed, s) for seed, s in
                                                                  enumerate([0.0, 1.0, 0.0, 0.0, 0.0])]
    rows += [row("streaming", 0, 0.0), row("kvpress:snapkv", 0, 1.0), row("full", 0, 1.0, keep=1.0)]
    result = {(p["policy"], p["partner"]): p for p in paired_with(rows, "snapkv")}
    assert sorted(result) == [("lookahead", "snapkv"), ("streaming", "snapkv")]  # not itself, kvpress or full
    lookahead = result[("lookahead", "snapkv")]
    assert (lookahead["n"], lookahead["n_differ"], lookahead["difference"]) == (5, 4, 0.8)
    assert 0.0 < lookahead["ci95"][0] < 0.8 < lookahead["ci95"][1] <= 1.0  # all five draws equal: P = 0.2**5
    assert result[("streaming", "snapkv")]["n"] == 1


def test_bench_accuracy_runs_of_disjoint_seeds_merge_into_one(tmp_path, model_path, capsys):
    arguments = ["bench", "accuracy", "-m", model_path, "--tasks", "niah_single", "--lengths", "256", "--keeps",
                 "1.0,0.5", "--policies", "streaming", "--settings", "query-agnostic"]
    for first_seed in (0, 1):
        assert main(arguments + ["--samples", "1", "--first-seed", str(first_seed),
                                 "-o", str(tmp_path / str(first_seed))]) == 0
    parts = [json.loads((tmp_path / seed / "accuracy.json").read_text()) for seed in ("0", "1")]
    assert [{row["seed"] for row in part["rows"]} for part in parts] == [{0}, {1}]
    assert parts[0]["rows"][0]["output"] != parts[1]["rows"][0]["output"]  # two different samples

    files = [str(tmp_path / seed / "accuracy.json") for seed in ("0", "1")]
    assert main(["bench", "merge-accuracy", *files, "-o", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "accuracy.json").read_text())
    schema.check("accuracy", merged)
    assert merged["rows"] == parts[0]["rows"] + parts[1]["rows"]
    assert (merged["samples"], merged["first_seed"]) == (2, 0)
    for cell in merged["summary"]:
        scores = [row["score"] for row in merged["rows"] if (row["policy"], row["keep"]) == (cell["policy"],
                                                                                           cell["keep"])]
        assert cell["n"] == 2 and cell["accuracy"] == sum(scores) / 2
    assert [part["file"] for part in merged["environment"]["parts"]] == files
    # the same as one run over both seeds
    assert main(arguments + ["--samples", "2", "-o", str(tmp_path / "both")]) == 0
    both = json.loads((tmp_path / "both" / "accuracy.json").read_text())
    assert both["rows"] == merged["rows"] and both["summary"] == merged["summary"]
    assert "Merged from runs of disjoint seeds" in (tmp_path / "merged" / "accuracy.md").read_text()
    # a paired comparison needs two policies; one that was not run is refused by name
    with pytest.raises(SystemExit):
        main(["bench", "merge-accuracy", *files, "--paired-against", "snapkv", "-o", str(tmp_path / "pairs")])
    assert "--paired-against 'snapkv' is not one of the policies run" in capsys.readouterr().err

    # the same seeds twice, or another configuration: refused by name, nothing written
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["bench", "merge-accuracy", files[0], files[0], "-o", str(tmp_path / "twice")])
    assert "seed 0 of niah_single at 256 tokens is also in" in capsys.readouterr().err
    parts[1]["keeps"] = [1.0, 0.3]
    (tmp_path / "other.json").write_text(json.dumps(parts[1]))
    with pytest.raises(SystemExit):
        main(["bench", "merge-accuracy", files[0], str(tmp_path / "other.json"), "-o", str(tmp_path / "other")])
    assert "keeps [1.0, 0.3] differs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "merge-accuracy", str(tmp_path / "missing.json")])
    assert "cannot read accuracy results" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists() and not (tmp_path / "other").exists()


def test_bench_without_its_extra_says_which_to_install(model_path, capsys, monkeypatch):
    """A plain install leaves matplotlib out (the [bench] extra): `kvgguf bench` says so in one line, exit 2."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "matplotlib" else real_find_spec(name, *args))
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "speed", "-m", model_path, "--lengths", "256"])
    assert exit_info.value.code == 2
    assert "pip install 'kvgguf[bench]'" in capsys.readouterr().err


def test_score_quality_measures():
    from kvgguf.bench.scores import kl_divergence, top_recall

    truth = np.array([[0.5, 0.3, 0.1, 0.1] + [0.0] * 16])
    assert kl_divergence(truth, truth * 3.0)[0] == pytest.approx(0.0, abs=1e-6)  # scores are normalized first
    assert kl_divergence(truth, np.ones_like(truth))[0] == pytest.approx(
        math.log(20) + (truth[truth > 0] * np.log(truth[truth > 0])).sum(), abs=1e-6)
    # top 10% of 20 cells = the 2 largest: cells 0 and 1
    assert top_recall(truth, np.arange(20.0)[::-1][None])[0] == 1.0
    assert top_recall(truth, np.array([[0.9, 0.0, 0.8] + [0.1] * 17]))[0] == 0.5
    assert top_recall(truth, np.arange(20.0)[None])[0] == 0.0


def test_bench_scores_judges_each_policy_on_held_out_answers(tmp_path, model_path):
    """Two held-out prompts with 24-token answers: every policy's KL and recall, random at about 10%."""
    out = tmp_path / "scores"
    assert main(["bench", "scores", "-m", model_path, "--examples", "2", "--max-response", "24", "--policies",
                 "lookahead,snapkv,streaming", "--data", str(tmp_path / "data"), "-o", str(out)]) == 0
    results = json.loads((out / "scores.json").read_text())
    schema.check("scores", results)
    assert len(list((tmp_path / "data" / "heldout").glob("*.npz"))) == 2  # cached for the next run
    overall = {s["policy"]: s for s in results["summary"] if s["kind"] == "all"}
    assert sorted(overall) == ["lookahead", "random", "snapkv", "streaming"]
    assert all(0.0 <= s["recall"] <= 1.0 and s["n"] == 2 for s in overall.values())
    assert overall["random"]["recall"] == pytest.approx(0.1, abs=0.03)
    assert overall["streaming"]["kl"] is None  # its scores are positions, not attention
    assert overall["lookahead"]["kl"] < overall["random"]["kl"] and overall["snapkv"]["kl"] < overall["random"]["kl"]
    assert {p["policy"] for p in results["paired"]} == {"lookahead", "streaming", "random"}
    assert (out / "scores.png").stat().st_size > 0 and "recall@10%" in (out / "scores.md").read_text()


def test_bench_scores_refuses_bad_arguments_by_name(model_path, capsys):
    for arguments, message in ((["--policies", "lookahead,nope"], "unknown policy 'nope'"),
                               (["--paired-against", "kvzip", "--policies", "snapkv"], "--paired-against 'kvzip'"),
                               (["--examples", "0"], "--examples must be >= 1, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "scores", "-m", model_path, *arguments])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_reasoning_answers_are_read_as_the_reference_harness_reads_them():
    assert extract_answer("so 3 + 4 = 7, and \\boxed{\\frac{1}{2}} is it") == "\\frac{1}{2}"
    assert extract_answer("first \\boxed{3}, then \\boxed{ -12 }") == "-12"
    assert extract_answer("She has 1,250 apples and gives 30 away, leaving 1,220.") == "1220"
    assert extract_answer("no number here") is None
    assert extract_answer("\\boxed{unclosed 5") == "5"
    assert agreement([1, 2, 9, 4], [1, 2, 3, 4, 5], 4) == 0.75
    assert agreement([1], [], 4) == 1.0
    assert budget_cells(100, 200, 0.25) == 150 and budget_cells(100, 1, 0.25) == 101


def test_bench_reasoning_keeps_each_policy_within_its_budget(tmp_path, model_path):
    """Two tiny problems, two decode-time policies at one budget: the files follow the schema, every evicting
    answer stayed within budget + window (lazy) or budget + 1 (the others, every token), the full cache was scored
    by reasoning-gym's own check, and a second run resumes from the rows file instead of answering again."""
    arguments = ["bench", "reasoning", "-m", model_path, "--tasks", "basic_arithmetic", "--samples", "2",
                 "--policies", "lazy,streaming:half", "--budgets", "0.5", "--max-tokens", "48", "--window", "8",
                 "--n-ctx", "512", "-o", str(tmp_path)]
    assert main(arguments) == 0
    results = json.loads((tmp_path / "reasoning.json").read_text())
    schema.check("reasoning", results)
    assert (tmp_path / "reasoning.md").exists() and (tmp_path / "reasoning.png").stat().st_size > 0
    rows = results["rows"]
    assert {(r["policy"], r["budget"]) for r in rows} == {("full", 1.0), ("lazy", 0.5), ("streaming:half", 0.5)}
    full = {r["seed"]: r for r in rows if r["policy"] == "full"}
    for row in rows:
        assert row["score"] in (0.0, 1.0)
        if row["policy"] == "full":
            assert row["peak_cells"] <= row["prompt_tokens"] + row["answer_tokens"] + 1 and row["evictions"] == 0
            continue
        assert row["kv_budget"] == row["prompt_tokens"] + math.ceil(0.5 * full[row["seed"]]["answer_tokens"])
        assert row["peak_cells"] <= row["kv_budget"] + (8 if row["policy"] == "lazy" else 1)
        assert row["window"] == (8 if row["policy"] == "lazy" else (row["kv_budget"] - 5) // 2)
        overflow = row["prompt_tokens"] + row["answer_tokens"] - row["kv_budget"]  # cells past the budget
        assert row["evictions"] <= max(overflow, 0) + 1  # this answer's evictions, not the model's so far
        if overflow > 8:
            assert row["evictions"] >= 1
    lines = (tmp_path / "reasoning.rows.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert main(arguments) == 0  # every answer is in the rows file: nothing is answered twice
    assert (tmp_path / "reasoning.rows.jsonl").read_text().splitlines() == lines


@pytest.mark.parametrize("arguments, message", [
    (["--policies", "snapkv"], "--policies: 'snapkv' is not a policy that evicts while decoding"),
    (["--budgets", "1.5"], "--budgets: 1.5 is not in (0, 1)"),
    (["--samples", "0"], "--samples must be >= 1, got 0"),
    (["--tasks", "no_such_task"], "--tasks: 'no_such_task' is not a reasoning-gym dataset"),
    (["--window", "0"], "--window must be >= 1, got 0"),
    (["--policies", "lazy:half"], "--policies: 'lazy:half': the one variant is '<policy>:half'"),
])
def test_bench_reasoning_refuses_bad_arguments_by_name(model_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "reasoning", "-m", model_path, *arguments])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_bench_serve_loads_a_server_and_writes_json_markdown_and_png(tmp_path, model_path):
    """Two requests per configuration against kvgguf serve on loopback: off, streaming per request, and from a
    compressed context."""
    pytest.importorskip("fastapi")
    assert main(["bench", "serve", "-m", model_path, "--requests", "2", "--concurrency", "2", "--doc-tokens", "120",
                 "--n-ctx", "512", "--policies", "streaming", "-o", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "serve.json").read_text())
    schema.check("serve", results)
    rows = {row["config"]: row for row in results["rows"]}
    assert list(rows) == ["off", "streaming", "context"]
    assert all(row["requests"] == 2 and row["requests_per_s"] > 0 and row["p95_s"] >= row["p50_s"] > 0
               for row in rows.values())
    assert rows["off"]["evictions"] == 0 and rows["streaming"]["evictions"] == 2
    assert rows["streaming"]["mean_cells_after"] < rows["off"]["mean_cells_after"]
    assert rows["context"]["mean_prompt_tokens"] > 0 and rows["context"]["compress_s"] > 0
    assert (tmp_path / "serve.png").stat().st_size > 0 and "req/s vs off" in (tmp_path / "serve.md").read_text()


def test_bench_serve_refuses_bad_arguments_by_name(model_path, capsys):
    for arguments, message in ((["--requests", "0"], "--requests must be >= 1, got 0"),
                               (["--policies", "snapkv@head"], "a request names a policy only"),
                               (["--policies", "nope"], "'nope'")):
        with pytest.raises(SystemExit):
            main(["bench", "serve", "-m", model_path, *arguments])
        assert message in capsys.readouterr().err
