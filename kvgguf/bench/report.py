"""Writing benchmark results: JSON with the raw numbers and the environment, a markdown table, PNG plots."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from ..models import MODEL_HELP
from . import schema

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT = Path("docs/benchmarks")
# extra cells for a policy that reconstructs the context (KVzip), so that a prompt that fits is scored in one pass
RECONSTRUCTION_CELLS = 1024


def cells_for(policies: list[str], n_cells: int) -> int:
    """n_ctx for ``n_cells`` of prompt and generation, plus KVzip's reconstruction room when a configuration
    (``kvzip``, ``kvzip+profile``, ...: kvgguf.bench.specs) needs it."""
    from ..policies import POLICIES
    from .specs import policy_spec

    reconstructs = any(POLICIES[policy_spec(p)[0]].decodes_to_score for p in policies if policy_spec(p)[0] in POLICIES)
    return n_cells + (RECONSTRUCTION_CELLS if reconstructs else 0)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """-m, --threads and -o, the same for every benchmark."""
    parser.add_argument("-m", "--model", help=MODEL_HELP)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (the benchmarks record them)")
    parser.add_argument("-o", "--output", default=str(DEFAULT_OUTPUT), help="folder for JSON/markdown/PNG")


BENCH_EXTRA_MISSING = ("kvgguf bench plots with matplotlib, which a plain install leaves out: "
                       "pip install 'kvgguf[bench]'")


def check_bench_extra() -> None:
    """ValueError (one line for the CLI) when the [bench] extra is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(BENCH_EXTRA_MISSING)


def pyplot() -> Any:
    """matplotlib.pyplot, drawing to files only (the Agg back-end)."""
    check_bench_extra()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG and release it."""
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def environment(threads: int) -> dict[str, Any]:
    """Where and how the numbers were taken."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("kvgguf", "llama-cpp-python", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gpu_layers": os.environ.get("LLAMA_ARG_N_GPU_LAYERS"),   # kvgguf.Llama offloads this many when set
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": versions,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def publish(name: str, results: dict[str, Any], markdown: Callable[[], str], plot: Callable[[Path], Path],
            output: Path, threads: int) -> list[Path]:
    """Write ``<name>.json`` (with the load average at the end added to its environment, checked against
    ``schema.SCHEMAS[name]``), ``<name>.md`` (made by ``markdown()`` after that) and ``<name>.png`` into
    ``output``, print the markdown; returns the paths."""
    output.mkdir(parents=True, exist_ok=True)
    results["environment"]["load_average_end"] = environment(threads)["load_average"]
    results.setdefault("schema_version", schema.SCHEMA_VERSION)
    schema.check(name, results)
    text = markdown()
    json_path = output / f"{name}.json"
    md_path = output / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(text)
    png_path = plot(output / f"{name}.png")
    logger.info("wrote %s, %s and %s", json_path, md_path, png_path)
    print(text)
    return [json_path, md_path, png_path]
