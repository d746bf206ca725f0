"""Hugging Face checkpoints into GGUF: ``kvgguf convert hf <dir> out.gguf [--outtype f16|q8_0]``.

The conversion is llama.cpp's own ``convert_hf_to_gguf.py`` and its ``conversion/`` package, from the pinned
llama.cpp source that the native build fetched; the build installs them beside gguf-py in the package
(``kvgguf/_llama_cpp``), so they match the libllama that loads the result and are neither copied into this
repository nor downloaded a second time. It runs in a child interpreter, as llama.cpp's users run it: it sets up
logging and exits on its own errors. What it needs (torch, transformers, sentencepiece) is the ``[convert]``
extra. A checkpoint it cannot convert (an architecture it does not know, a tokenizer it does not recognise) raises
:class:`ConversionError` with the converter's own message.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import logging
import re
import subprocess
import sys
from pathlib import Path

from kvgguf._native import built_dir

logger = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# modules the converter imports for every checkpoint (sentencepiece only for SentencePiece tokenizers)
REQUIRED_MODULES = ("torch", "transformers", "numpy")
# how many lines of the converter's output an error quotes at most
_ERROR_LINES = 4
_LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.-]+:(.*)$")


class ConversionError(ValueError):
    """The converter refused or failed on a checkpoint; the message is the converter's."""


def converter_script() -> Path:
    """The pinned ``convert_hf_to_gguf.py`` that the build installed into the package."""
    return built_dir("_llama_cpp", "convert_hf_to_gguf.py") / "convert_hf_to_gguf.py"


def check_checkpoint(model_dir: Path) -> None:
    """Raise ValueError unless ``model_dir`` is a folder with a Hugging Face ``config.json``."""
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: no such checkpoint folder")
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: not a Hugging Face checkpoint (it has no config.json)")


def check_dependencies() -> None:
    """Raise ImportError naming the extra when a module the converter imports is missing."""
    missing = [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"kvgguf convert hf needs {', '.join(missing)}: pip install 'kvgguf[convert]'")


def _error_message(lines: list[str]) -> str:
    """The converter's reason for failing: its ERROR log lines, else the last line of its traceback."""
    errors = [match.group(2).strip() for line in lines if (match := _LOG_LINE.match(line))
              and match.group(1) in ("ERROR", "CRITICAL")]
    if errors:
        return "; ".join(errors[-_ERROR_LINES:])
    text = [line.strip() for line in lines if line.strip() and not _LOG_LINE.match(line)]
    return text[-1] if text else "it exited without a message"


def convert_hf(model_dir: str | Path, out: str | Path, outtype: str = "f16", model_name: str | None = None) -> Path:
    """Convert the Hugging Face checkpoint in ``model_dir`` into the GGUF file ``out``, its weights stored as
    ``outtype`` (one of :data:`OUTTYPES`); return ``out``. The converter's log goes to this module's logger at
    DEBUG; a failure raises :class:`ConversionError` with its message."""
    model_dir, out = Path(model_dir), Path(out)
    check_checkpoint(model_dir)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give the GGUF file to write")
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent}: no such folder to write {out.name} into")
    check_dependencies()
    command = [sys.executable, str(converter_script()), str(model_dir), "--outfile", str(out), "--outtype", outtype]
    if model_name:
        command += ["--model-name", model_name]
    logger.info("converting %s to %s (%s) with llama.cpp's convert_hf_to_gguf.py", model_dir, out, outtype)
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as child:
        assert child.stdout is not None
        for line in child.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            logger.debug("convert_hf_to_gguf: %s", line)
    if child.returncode != 0:
        raise ConversionError(f"{model_dir}: llama.cpp's converter failed: {_error_message(list(tail))}")
    if not out.is_file():
        raise ConversionError(f"{model_dir}: llama.cpp's converter exited without writing {out}")
    return out


def describe(path: Path) -> str:
    """One line about a GGUF file: its architecture, name, tensor count and size."""
    from kvgguf.gguf_py import gguf_module

    reader = gguf_module().GGUFReader(str(path))

    def field(key: str) -> str:
        value = reader.get_field(key)
        return value.contents() if value is not None else "?"

    size_mb = path.stat().st_size / 2**20
    return (f"{path}: {field('general.architecture')} '{field('general.name')}', {len(reader.tensors)} tensors, "
            f"{size_mb:.1f} MiB")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="folder of a Hugging Face checkpoint (config.json, "
                                                     "*.safetensors, tokenizer files)")
    parser.add_argument("out", type=Path, help="the GGUF file to write")
    parser.add_argument("--outtype", default="f16", choices=OUTTYPES,
                        help="how the weights are stored (default: %(default)s)")
    parser.add_argument("--model-name", help="general.name in the GGUF (default: from the checkpoint)")


def main(args: argparse.Namespace) -> int:
    out = convert_hf(args.model_dir, args.out, args.outtype, args.model_name)
    print(describe(out))
    return 0
