"""The benchmark code runs end to end on a tiny configuration and writes its files (no timing asserted)."""
from __future__ import annotations

import json
import os

from kvgguf.cli import main


def test_bench_speed_writes_json_markdown_and_png(tmp_path, model_path):
    code = main(["bench", "speed", "-m", model_path, "--n-long", "600", "--n-short", "256", "--n-decode", "2",
                 "--rounds", "1", "-o", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "speed.json").read_text())
    assert set(results["decode_tok_s"]) == {"full_8k", "compressed_2k", "fresh_2k"}
    assert results["snapkv"]["cells_before"] == 600 and results["snapkv"]["cells_after"] == 256
    assert results["remove_scattered"]["freed"] == 600 - 256
    assert results["attended_window"]["compressed_2k"] == results["attended_window"]["fresh_2k"]
    assert results["attended_window"]["compressed_2k"] < results["attended_window"]["full_8k"]
    assert results["environment"]["threads"] == 2 and "load_average" in results["environment"]
    assert os.path.getsize(tmp_path / "speed.png") > 1000
    assert "(b) >= 0.95 x (c)" in (tmp_path / "speed.md").read_text()


def test_bench_accuracy_writes_a_summary_per_cell(tmp_path, model_path):
    code = main(["bench", "accuracy", "-m", model_path, "--tasks", "niah_single", "--lengths", "256",
                 "--samples", "1", "--keeps", "1.0,0.5", "--policies", "streaming", "-o", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "accuracy.json").read_text())
    cells = {(s["setting"], s["policy"], s["keep"]): s for s in results["summary"]}
    assert set(cells) == {(setting, policy, keep) for setting in ("query-aware", "query-agnostic")
                          for policy, keep in (("full", 1.0), ("streaming", 0.5))}
    assert all(s["n"] == 1 and 0.0 <= s["accuracy"] <= 1.0 for s in cells.values())
    # the needle at 256 tokens is found with the full cache in both settings
    assert cells[("query-aware", "full", 1.0)]["accuracy"] == 1.0
    assert cells[("query-agnostic", "full", 1.0)]["accuracy"] == 1.0
    rows = [r for r in results["rows"] if r["policy"] == "streaming"]
    assert all(r["cells_after_eviction"] < r["prompt_tokens"] for r in rows)
    assert os.path.getsize(tmp_path / "accuracy.png") > 1000
