"""``kvgguf serve``: llama-cpp-python's OpenAI-compatible server (``llama_cpp.server``: its FastAPI app, settings,
request models, locks and streaming), extended rather than rewritten, on a ``kvgguf.Llama``.

What it adds:

- per-request ``kv_eviction``, ``kv_keep``, ``kv_budget``, ``kv_window`` on ``/v1/completions`` and
  ``/v1/chat/completions`` (absent: the server's defaults from ``kvgguf serve --kv-*``; ``"kv_eviction": null``:
  no eviction for that request), and the KV-cache statistics of each answer in its ``usage.kv``;
- named compressed contexts (``/v1/contexts``): a document compressed once, kept on disk as a ``.kvc`` file that
  survives a restart, and answered from by any request that names it with ``"context": "<id>"``;
- bad input answered with an HTTP 4xx and an OpenAI-style error body naming the value (llama-cpp-python answers
  most of it with a 500), the server still serving.

Requests are served one at a time, in arrival order, by llama-cpp-python's two locks: a ``kvgguf.Llama`` holds one
sequence whose cache the eviction engine rewrites in place, and each request may reconfigure its eviction, so two
requests may never share it. A queued request does not cut a live stream short (``interrupt_requests`` off).
"""
from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # the app imports the [server] extra's modules: only when asked for (``kvgguf serve`` names a missing one)
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
