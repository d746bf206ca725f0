"""kvgguf: importance-based KV-cache eviction for GGUF models inside llama.cpp.

Import kvgguf before llama_cpp: it points llama-cpp-python at kvgguf's patched libllama.
"""
from __future__ import annotations

from . import _native  # noqa: F401  (sets LLAMA_CPP_LIB_PATH before anything imports llama_cpp)

_native.expose_checkout_converters()  # kvgguf.convert, imported from a source checkout
from .contexts import CompressedContext, ContextFileError, KVSnapshot
from .controller import EvictionController
from .conversation import Conversation, ConversationFull
from .engine import CellState, EvictionEngine, KVCacheView, KVStats
from .llama import Llama
from .models import default_model_path
from .policies import POLICIES, Policy
from .scoring import LoraAdapter, ScoringContext, TapSpec
from .settings import EvictionSettings

__version__ = "0.1.0"

__all__ = ["POLICIES", "CellState", "CompressedContext", "ContextFileError", "Conversation",
           "ConversationFull", "EvictionController", "EvictionEngine",
           "EvictionSettings", "KVCacheView", "KVSnapshot", "KVStats", "Llama", "LoraAdapter", "Policy",
           "ScoringContext", "TapSpec", "default_model_path", "__version__"]
