"""gguf-py, llama.cpp's own GGUF reader and writer, from the pinned llama.cpp source that the native build
fetched: the build installs it into the package (``kvgguf/_llama_cpp/gguf-py``), so it is neither copied into
this repository nor downloaded a second time. Its modules import each other as the top-level ``gguf``."""
from __future__ import annotations

import logging
import sys
from types import ModuleType

from ._native import built_dir

logger = logging.getLogger(__name__)


def gguf_module() -> ModuleType:
    """The ``gguf`` package. An interpreter that imported another ``gguf`` first (a gguf-py wheel, say) keeps it."""
    if "gguf" not in sys.modules:
        path = str(built_dir("_llama_cpp/gguf-py", "gguf/__init__.py"))
        if path not in sys.path:
            sys.path.insert(0, path)
    import gguf

    gguf_logger = logging.getLogger("gguf")
    if gguf_logger.level == logging.NOTSET:  # its writer logs every file it writes at INFO
        gguf_logger.setLevel(logging.WARNING)
    logger.debug("gguf-py from %s", gguf.__file__)
    return gguf
