"""kvgguf: importance-based KV-cache eviction for GGUF models inside llama.cpp.

Import kvgguf before llama_cpp: it points llama-cpp-python at kvgguf's patched libllama.
"""
from __future__ import annotations

from . import _native  # noqa: F401  (sets LLAMA_CPP_LIB_PATH before anything imports llama_cpp)
from .context import CompressedContext, ContextFileError
from .engine import EvictionEngine, KVCacheView, KVStats
from .llama import Llama
from .models import default_model_path
from .policies import POLICIES, Policy
from .settings import EvictionSettings

__version__ = "0.1.0"

__all__ = ["POLICIES", "CompressedContext", "ContextFileError", "EvictionEngine", "EvictionSettings", "KVCacheView",
           "KVStats", "Llama", "Policy", "default_model_path", "__version__"]
