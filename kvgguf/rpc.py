"""More than one machine: llama.cpp's RPC backend, built with kvgguf (``-DKVGGUF_RPC=ON``, the default).

Each other host runs ``kvgguf rpc-server`` (llama.cpp's ``ggml-rpc-server``, built from the same pinned source), which
offers that host's devices (its GPUs, else its CPU) over TCP. This process registers the servers as devices
(``add_servers``, what ``kvgguf.Llama(rpc_servers=...)`` and llama.cpp's ``--rpc`` do) and ``n_gpu_layers`` then
places that many of the model's last layers on them, split between the devices by their free memory. Eviction works
unchanged: the KV cache of a layer lives with the layer, and removing, compacting and scoring cells are ggml ops and
tensor reads that the RPC backend carries to the host that holds them.

Servers stay registered for the process's life, as with llama.cpp's tools, but a model uses only the servers it
was given (``model_devices``): llama.cpp's default would put every later model on them, and query them while
loading even with ``n_gpu_layers=0``, so one server going away would stop every later load. The RPC protocol is
neither authenticated nor encrypted: run servers on a trusted network only.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from ._native import LIB_DIR, _shared_library_name, llama_cpp_api

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_load_lock = threading.Lock()   # held while a model loads with its own device list
_registered: dict[str, list[str]] = {}   # endpoint -> the device names llama.cpp gave it
_ggml: ctypes.CDLL | None = None


def server_path() -> Path:
    """The ``ggml-rpc-server`` executable built with kvgguf; FileNotFoundError if this build has none."""
    path = LIB_DIR.parent / "bin" / ("ggml-rpc-server.exe" if sys.platform == "win32" else "ggml-rpc-server")
    if not path.is_file():
        raise FileNotFoundError(f"this kvgguf build has no RPC server ({path} is missing): build it with "
                                "-DKVGGUF_RPC=ON (the default) in CMAKE_ARGS")
    return path


def parse_endpoints(servers: str | Sequence[str]) -> list[str]:
    """``"host:port,host:port"`` (llama.cpp's ``--rpc``) or a list of ``"host:port"``: the endpoints, checked;
    ValueError naming the bad one."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    endpoints = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"rpc_servers: each server is a 'host:port' string, got {item!r}")
        endpoint = item.strip()
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"rpc_servers: {item!r} is not 'host:port' with a port in 1-65535")
        endpoints.append(endpoint)
    if not endpoints:
        raise ValueError("rpc_servers: no server given")
    return endpoints


def _library() -> ctypes.CDLL:
    global _ggml
    if _ggml is None:
        lib = ctypes.CDLL(str(LIB_DIR / _shared_library_name("ggml")))
        for name, argtypes, restype in (
                ("ggml_backend_reg_by_name", [ctypes.c_char_p], ctypes.c_void_p),
                ("ggml_backend_reg_get_proc_address", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
                ("ggml_backend_register", [ctypes.c_void_p], None),
                ("ggml_backend_reg_dev_count", [ctypes.c_void_p], ctypes.c_size_t),
                ("ggml_backend_reg_dev_get", [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
                ("ggml_backend_dev_name", [ctypes.c_void_p], ctypes.c_char_p),
                ("ggml_backend_dev_count", [], ctypes.c_size_t),
                ("ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p),
                ("ggml_backend_dev_type", [ctypes.c_void_p], ctypes.c_int)):
            function = getattr(lib, name)
            function.argtypes = argtypes
            function.restype = restype
        _ggml = lib
    return _ggml


def add_servers(servers: str | Sequence[str]) -> list[str]:
    """Register RPC servers as devices of this process (each once); returns their device names, in order.
    ValueError if this build has no RPC backend or a server cannot be reached (nothing of it is registered)."""
    endpoints = parse_endpoints(servers)
    lib = _library()
    with _lock:
        rpc = lib.ggml_backend_reg_by_name(b"RPC")
        if not rpc:
            raise ValueError("rpc_servers: this kvgguf build has no RPC backend (build it with -DKVGGUF_RPC=ON)")
        address = lib.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server")
        if not address:
            raise ValueError("rpc_servers: the RPC backend does not offer ggml_backend_rpc_add_server")
        add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(address)
        names: list[str] = []
        for endpoint in endpoints:
            if endpoint not in _registered:
                # the ValueError below names the server; llama.cpp's own error line would say it twice
                llama_logger = logging.getLogger("llama-cpp-python")
                level = llama_logger.level
                llama_logger.setLevel(logging.CRITICAL)
                try:
                    reg = add_server(endpoint.encode())
                finally:
                    llama_logger.setLevel(level)
                if not reg:   # no connection, or a server that offers no device
                    raise ValueError(f"rpc_servers: cannot reach an RPC server at {endpoint!r} (is `kvgguf "
                                     "rpc-server` running there, of the same kvgguf version?)")
                lib.ggml_backend_register(reg)
                _registered[endpoint] = [lib.ggml_backend_dev_name(lib.ggml_backend_reg_dev_get(reg, i)).decode()
                                         for i in range(lib.ggml_backend_reg_dev_count(reg))]
                logger.info("RPC server %s: devices %s", endpoint, ", ".join(_registered[endpoint]))
            names.extend(_registered[endpoint])
        return names


_DEVICE_GPU, _DEVICE_IGPU = 1, 2   # enum ggml_backend_dev_type


def load_devices(servers: str | Sequence[str] | None) -> ctypes.Array | None:
    """The devices a model loads onto (``llama_model_params.devices``, NULL-terminated): the devices of its own
    RPC ``servers`` first, then this host's GPUs (else its integrated GPUs), as llama.cpp's default selection
    orders them, without the servers registered for other models. None while no server is registered in the
    process: llama.cpp's default, which is then the same list."""
    with _lock:
        if not _registered:
            return None
        ours = {name for endpoint in (parse_endpoints(servers) if servers is not None else [])
                for name in _registered[endpoint]}
        any_rpc = {name for names in _registered.values() for name in names}
        lib = _library()
        remote, gpus, igpus = [], [], []
        for index in range(lib.ggml_backend_dev_count()):
            device = lib.ggml_backend_dev_get(index)
            name = lib.ggml_backend_dev_name(device).decode()
            kind = lib.ggml_backend_dev_type(device)
            if name in any_rpc:
                if name in ours:
                    remote.append(device)
            elif kind == _DEVICE_GPU:
                gpus.append(device)
            elif kind == _DEVICE_IGPU:
                igpus.append(device)
        chosen = remote + gpus + (igpus if not gpus else [])
        return (ctypes.c_void_p * (len(chosen) + 1))(*chosen, None)


@contextlib.contextmanager
def model_devices(devices: ctypes.Array | None) -> Iterator[None]:
    """While a ``llama_cpp.Llama`` loads in this block, its model params list ``devices`` (None: unchanged).
    llama-cpp-python builds the params from ``llama_model_default_params()`` and offers no argument for them."""
    if devices is None:
        yield
        return
    with _load_lock:
        default_params = llama_cpp_api.llama_model_default_params

        def params_with_devices():   # type: ignore[no-untyped-def]
            params = default_params()
            params.devices = ctypes.addressof(devices)
            return params

        llama_cpp_api.llama_model_default_params = params_with_devices
        try:
            yield
        finally:
            llama_cpp_api.llama_model_default_params = default_params
