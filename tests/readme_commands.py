"""The README's command lines, so that tests run them as written (and the README cannot rot)."""
from __future__ import annotations

import shlex
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands(command: str) -> list[list[str]]:
    """The README's ``.venv/bin/kvgguf <command> ...`` lines, as argument lists (from ``<command>`` on)."""
    prefix = f".venv/bin/kvgguf {command} "
    return [shlex.split(line.strip())[1:] for line in README.read_text().splitlines()
            if line.strip().startswith(prefix)]
