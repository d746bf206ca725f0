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
