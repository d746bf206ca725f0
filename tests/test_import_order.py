"""Installed kvgguf makes llama-cpp-python load its patched libllama on its own: `import llama_cpp` before (or
without) `import kvgguf` works in a fresh interpreter, with no LLAMA_CPP_LIB_PATH set by the user (kvgguf.pth)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kvgguf._native import LIB_DIR

CODE = """
import llama_cpp
import llama_cpp.llama_cpp as api
print(api._lib._name)
print(hasattr(api._lib, "llama_kv_compact"))
import kvgguf
print(kvgguf.Llama.__module__)
"""


def test_import_llama_cpp_first_loads_kvgguf_library(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "LLAMA_CPP_LIB_PATH"}
    out = subprocess.run([sys.executable, "-c", CODE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    library, patched, module = out.stdout.split()
    assert Path(library).resolve() == LIB_DIR / Path(library).name and Path(library).name.startswith("libllama")
    assert patched == "True" and module == "kvgguf.llama"


def test_a_library_path_set_by_the_user_is_respected(tmp_path):
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", "import llama_cpp"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "not found" in out.stderr  # no libllama there: llama_cpp says so
