"""The eviction paths give bit-identical results to those recorded before the policies took over their scoring
(tests/same_results.py recorded them at the commit before the move, on a host with the same CPU features):
per-(layer, head, cell) scores and kept positions of snapkv, streaming and kvzip (head and token), chunked prompts
longer than n_ctx, decode-time evictions, and a compressed context through its file."""
from __future__ import annotations

import json

import pytest

import same_results

RECORDED = json.loads(same_results.RESULTS_FILE.read_text())


@pytest.mark.parametrize("case", sorted(RECORDED["cases"]))
def test_same_results_as_recorded(model_path, case):
    if same_results.host_features() != RECORDED["host_features"]:
        pytest.skip(f"recorded on a host with CPU features {RECORDED['host_features']}; this one has "
                    f"{same_results.host_features()} (other SIMD paths round differently)")
    assert same_results.collect(model_path, [case])[case] == RECORDED["cases"][case]
