"""The native side of kvgguf: our patched libllama (through llama-cpp-python's bindings) and libkvgguf.

kvgguf ships its own build of llama.cpp in ``kvgguf/lib``. Importing this module points llama-cpp-python at it
(``LLAMA_CPP_LIB_PATH``) *before* ``llama_cpp`` is imported, so the Python bindings and kvgguf share one native
library, and declares ctypes signatures for the functions our patches add.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

def _shared_library_name(base: str) -> str:
    if sys.platform == "win32":
        return f"{base}.dll"
    if sys.platform == "darwin":
        return f"lib{base}.dylib"
    return f"lib{base}.so"


def built_dir(relative: str, marker: str) -> Path:
    """A directory that the native build installs into the package (``relative`` to it, holding ``marker``):
    next to this file, or, imported from a source checkout (which has no build in it), the installed
    package's."""
    here = Path(__file__).resolve().parent / relative
    if (here / marker).exists():
        return here
    try:
        installed = Path(str(importlib.metadata.distribution("kvgguf").locate_file(f"kvgguf/{relative}"))).resolve()
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and (installed / marker).exists():
        return installed
    raise ImportError(f"kvgguf's build output {relative}/{marker} is missing from {here.parent} and kvgguf is not "
                      "installed; install it (bash scripts/install.sh, see README.md)")


LIB_DIR = built_dir("lib", _shared_library_name("llama"))


def expose_checkout_converters() -> None:
    """Imported from a source checkout, make its ``convert/`` the ``kvgguf.convert`` subpackage, as the wheel
    installs it (pyproject.toml: wheel.packages), so that the checkout's converters are the ones used."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "convert"
    if (package / "convert").is_dir() or not (checkout / "__init__.py").is_file() or "kvgguf.convert" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("kvgguf.convert", checkout / "__init__.py",
                                                  submodule_search_locations=[str(checkout)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kvgguf.convert"] = module
    spec.loader.exec_module(module)


def _point_llama_cpp_at_our_library() -> None:
    previous = os.environ.get("LLAMA_CPP_LIB_PATH")
    if previous and Path(previous).resolve() != LIB_DIR:
        logger.warning("LLAMA_CPP_LIB_PATH=%s is replaced by kvgguf's own build at %s", previous, LIB_DIR)
    if "llama_cpp.llama_cpp" in sys.modules:
        loaded = Path(getattr(sys.modules["llama_cpp.llama_cpp"]._lib, "_name", "")).resolve()
        if loaded.parent != LIB_DIR:
            raise ImportError(
                f"llama_cpp was imported before kvgguf and loaded {loaded}; import kvgguf first so that "
                "llama_cpp uses kvgguf's patched libllama"
            )
    os.environ["LLAMA_CPP_LIB_PATH"] = str(LIB_DIR)


_point_llama_cpp_at_our_library()

import llama_cpp  # noqa: E402  (must follow the LLAMA_CPP_LIB_PATH set-up above)
import llama_cpp.llama_cpp as llama_cpp_api  # noqa: E402

libllama: ctypes.CDLL = llama_cpp_api._lib
libkvgguf: ctypes.CDLL = ctypes.CDLL(str(LIB_DIR / _shared_library_name("kvgguf")))

# which llama.cpp and which patch set built these libraries (cmake/prepare_llama.py --build-info)
BUILD_INFO: dict = json.loads((LIB_DIR / "build_info.json").read_text())

_int32 = ctypes.c_int32
_int32_p = ctypes.POINTER(ctypes.c_int32)
_int64 = ctypes.c_int64
_float_p = ctypes.POINTER(ctypes.c_float)
_uint8_p = ctypes.POINTER(ctypes.c_uint8)
_void_p = ctypes.c_void_p


def _declare(lib: ctypes.CDLL, name: str, argtypes: list, restype) -> None:
    function = getattr(lib, name)
    function.argtypes = argtypes
    function.restype = restype


# --- functions added by patches/ to libllama (see the patched llama.h) ---
_declare(libllama, "llama_memory_seq_positions", [_void_p, _int32, _int32_p, _int32], _int32)
_declare(libllama, "llama_memory_seq_rm_pos", [_void_p, _int32, _int32_p, _int32], _int32)
_declare(libllama, "llama_memory_n_attended", [_void_p, _int32], _int32)
_declare(libllama, "llama_kv_compact", [_void_p, _int32, _int32_p, _int32], _int32)
_declare(libllama, "llama_memory_seq_n_mixed", [_void_p, _int32, _int32, _int32], _int32)
_declare(libllama, "llama_memory_seq_set_mixed", [_void_p, _int32, _int32_p, _int32], _int32)
_declare(libllama, "llama_memory_can_compact_per_head", [_void_p], ctypes.c_bool)


class KVTierParams(ctypes.Structure):
    """struct llama_kv_tier_params (patches/0012)."""

    _fields_ = [
        ("n_tiers", ctypes.c_int32),
        ("n_cells", ctypes.POINTER(ctypes.c_uint32)),
        ("tier_of_head", _int32_p),
    ]


_declare(libllama, "llama_set_kv_tiers", [_void_p, ctypes.POINTER(KVTierParams)], _int32)
_declare(libllama, "llama_memory_n_tiers", [_void_p], _int32)
_declare(libllama, "llama_memory_size", [_void_p], ctypes.c_size_t)
_declare(libllama, "llama_memory_tier", [_void_p, _int32], _void_p)
_declare(libllama, "llama_kv_compact_tier", [_void_p, _int32, _int32, _int32_p, _int32], _int32)


class AttnTapParams(ctypes.Structure):
    """struct llama_attn_tap_params (patches/0003)."""

    _fields_ = [
        ("seq_id", ctypes.c_int32),
        ("p0", ctypes.c_int32),
        ("p1", ctypes.c_int32),
        ("reduce_rows", ctypes.c_int32),
        ("reduce_heads", ctypes.c_int32),
    ]


_declare(libllama, "llama_attn_tap_set", [_void_p, ctypes.POINTER(AttnTapParams)], _int32)
_declare(libllama, "llama_attn_tap_n_rows", [_void_p], _int32)
_declare(libllama, "llama_attn_tap_get", [_void_p, _int32, _float_p, _int32], _int32)
_declare(libllama, "llama_attn_tap_get_tier", [_void_p, _int32, _int32, _float_p, _int32], _int32)

# --- libkvgguf (native/include/kvgguf.h) ---
_declare(libkvgguf, "kvgguf_api_version", [], _int32)
_declare(libkvgguf, "kvgguf_maxpool1d", [_float_p, _float_p, _int64, _int64, _int32], _int32)
_declare(libkvgguf, "kvgguf_reduce_rows", [_float_p, _float_p, _int64, _int64, _int64, _int32], _int32)
_declare(libkvgguf, "kvgguf_select_topk", [_float_p, _uint8_p, _int64, _int64, _int64, _int32_p], _int32)
_declare(libkvgguf, "kvgguf_lazy_observe",
         [_float_p, _int64, _int32_p, _int32_p, _int64, _int64, _int64, _int32, ctypes.c_float], _int32)

# llama_kv_evict_error, mirrored from the patched llama.h
KV_EVICT_ERRORS = {
    -1: "the context's memory does not support eviction (recurrent, hybrid, iSWA or shared-cell caches)",
    -2: "invalid sequence id",
    -3: "invalid argument (NULL array or negative count)",
    -4: "a position that the sequence does not hold",
    -5: "the newest position of the sequence cannot be evicted",
    -6: "invalid keep lists (empty, a repeated position, or a shared cell kept by only some heads)",
    -7: "moving the K/V rows failed (graph allocation or compute)",
    -8: "keep lists that differ per KV head on a model with ALiBi (its bias needs each cell's one position)",
}

# kvgguf_status, mirrored from native/include/kvgguf.h
KVGGUF_ERRORS = {
    -1: "invalid argument",
    -2: "max-pool kernel must be odd and positive",
    -3: "budget larger than the row or smaller than the protected cells",
    -4: "out of memory",
}
KVGGUF_REDUCE = {"max": 0, "mean": 1}


class NativeError(RuntimeError):
    """A native kvgguf or patched-llama.cpp call returned an error code."""


def check_kv(code: int, what: str) -> int:
    """Return ``code`` if it is a count, raise NativeError naming ``what`` if it is a llama_kv_evict_error."""
    if code < 0:
        raise NativeError(f"{what}: {KV_EVICT_ERRORS.get(code, 'unknown error')} (code {code})")
    return code


def check_kvgguf(code: int, what: str) -> None:
    if code != 0:
        raise NativeError(f"{what}: {KVGGUF_ERRORS.get(code, 'unknown error')} (code {code})")


__all__ = [
    "AttnTapParams", "BUILD_INFO", "KVTierParams", "LIB_DIR", "NativeError", "check_kv", "check_kvgguf", "libkvgguf", "libllama", "llama_cpp", "llama_cpp_api",
]
