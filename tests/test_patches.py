"""The patches are upstream-style: numbered, one concern each, with a header saying what and why."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

PATCHES = sorted((Path(__file__).resolve().parent.parent / "patches").glob("*.patch"))


def test_patches_are_numbered_in_order():
    assert [int(p.name[:4]) for p in PATCHES] == list(range(1, len(PATCHES) + 1))


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_patch_has_a_header_before_its_diff(patch):
    text = patch.read_text()
    header, separator, diff = text.partition("\n---\n")
    assert separator and diff.startswith("diff --git"), "header, a '---' line, then the diff"
    assert re.search(r"^Subject: \[PATCH \d+/\d+\] \S", header, re.M)
    assert "What:" in header and "Why:" in header
    assert "diff --git" not in header
