"""Named compressed contexts of ``kvgguf serve``: ``POST /v1/contexts`` compresses a document once (``Llama.compress``)
into ``<contexts_dir>/<id>.kvc`` with a JSON description beside it, so contexts survive a restart; completion and
chat requests with ``"context": "<id>"`` answer from it without compressing again; ``GET /v1/contexts[/<id>]``
describes them and ``DELETE /v1/contexts/<id>`` removes one.

The contexts a request uses are kept loaded (a file is read and checked against the model once)."""
from __future__ import annotations

import contextlib
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Optional

import llama_cpp.server.app as llama_app
from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..contexts import CompressedContext

# ids the store makes, and the only ones it looks up (no path can be named through an id)
ID_PATTERN = re.compile(r"^ctx-[0-9a-f]{16}$")


class CreateContextRequest(BaseModel):
    document: str = Field(..., description="the text to compress: the start of a user turn of the chat template")
    system: Optional[str] = Field(None, description="a system prompt before it (part of the context)")
    kv_eviction: Optional[str] = Field(None, description="the policy (default: the server's, else kvzip)")
    kv_keep: Optional[float] = Field(None, description="fraction of the document's cells kept")
    kv_budget: Optional[int] = Field(None, description="cells kept (instead of kv_keep)")


class ContextStore:
    """The contexts in one folder: ``<id>.kvc`` (the compressed cache) and ``<id>.json`` (its description)."""

    def __init__(self, folder: str | Path, not_found: Callable[[str], Exception]) -> None:
        """``not_found(id)`` is the exception for an id the store does not hold."""
        self.folder = Path(folder)
        self.not_found = not_found
        self.folder.mkdir(parents=True, exist_ok=True)
        self._loaded: dict[str, CompressedContext] = {}

    def _paths(self, context_id: str) -> tuple[Path, Path]:
        if not ID_PATTERN.match(context_id):
            raise self.not_found(context_id)
        data, info = self.folder / f"{context_id}.kvc", self.folder / f"{context_id}.json"
        if not (data.is_file() and info.is_file()):
            raise self.not_found(context_id)
        return data, info

    def create(self, llm: Any, request: CreateContextRequest) -> dict[str, Any]:
        """Compress ``request.document`` with ``llm`` and keep it; its description."""
        context = llm.compress(request.document, keep=request.kv_keep, budget=request.kv_budget,
                               system=request.system, policy=request.kv_eviction)
        context_id = f"ctx-{secrets.token_hex(8)}"
        data = context.save(self.folder / f"{context_id}.kvc")
        info = {"id": context_id, "object": "context", "created": int(time.time()), "model": Path(llm.model_path).name,
                "policy": context.policy, "keep": context.keep, "budget": context.budget,
                "n_tokens": context.n_tokens, "n_cells": context.n_cells, "kept_ratio": round(context.kept_ratio, 4),
                # the K/V the compressed cache holds (every tier's cells), against a full cache of the document
                "state_bytes": len(context.state),
                "full_cache_bytes": context.n_tokens * llm.kv_stats()["bytes_per_cell"],
                "file_bytes": data.stat().st_size}
        (self.folder / f"{context_id}.json").write_text(json.dumps(info))
        self._loaded[context_id] = context
        return info

    def describe(self, context_id: str) -> dict[str, Any]:
        info = self._paths(context_id)[1]
        return json.loads(info.read_text())

    def list(self) -> list[dict[str, Any]]:
        infos = []
        for info in self.folder.glob("ctx-*.json"):
            if ID_PATTERN.match(info.stem) and info.with_suffix(".kvc").is_file():
                infos.append(json.loads(info.read_text()))
        return sorted(infos, key=lambda entry: (entry["created"], entry["id"]))

    def load(self, context_id: str, llm: Any) -> CompressedContext:
        """The context, read and checked against ``llm`` the first time (ValueError for a file of another model
        or a damaged one)."""
        data, _ = self._paths(context_id)
        if context_id not in self._loaded:
            self._loaded[context_id] = llm.load_context(data)
        return self._loaded[context_id]

    def delete(self, context_id: str) -> None:
        for path in self._paths(context_id):
            path.unlink()
        self._loaded.pop(context_id, None)


def not_found_error(api_error: Callable[..., Exception]) -> Callable[[str], Exception]:
    def not_found(context_id: str) -> Exception:
        return api_error(404, f"no context {context_id!r}: ids are those POST /v1/contexts returned",
                         param="context", code="context_not_found")
    return not_found


def add_context_routes(router: APIRouter, store: ContextStore, api_error: Callable[..., Exception],
                       apply_defaults: Callable[[Any, Any], None]) -> None:
    """``/v1/contexts`` on ``router``; ``api_error(status, message, param=)`` makes the 400 errors,
    ``apply_defaults(proxy, llama)`` puts the server's default eviction settings in force."""

    dependencies = [Depends(llama_app.authenticate)]

    async def create(body: CreateContextRequest) -> dict[str, Any]:
        if not body.document.strip():
            raise api_error(400, "document must be a non-empty text", param="document")
        async with contextlib.asynccontextmanager(llama_app.get_llama_proxy)() as proxy:
            llama = proxy(None)
            # the server's default policy, not the one a request left configured, is compress()'s default
            await run_in_threadpool(apply_defaults, proxy, llama)
            return await run_in_threadpool(store.create, llama, body)

    async def list_contexts() -> dict[str, Any]:
        return {"object": "list", "data": store.list()}

    async def describe(context_id: str) -> dict[str, Any]:
        return store.describe(context_id)

    async def delete(context_id: str) -> dict[str, Any]:
        store.delete(context_id)
        return {"id": context_id, "object": "context.deleted", "deleted": True}

    router.add_api_route("/v1/contexts", create, methods=["POST"], dependencies=dependencies, response_model=None,
                         summary="Compress a document into a named context")
    router.add_api_route("/v1/contexts", list_contexts, methods=["GET"], dependencies=dependencies,
                         response_model=None, summary="List the compressed contexts")
    router.add_api_route("/v1/contexts/{context_id}", describe, methods=["GET"], dependencies=dependencies,
                         response_model=None, summary="Describe a compressed context")
    router.add_api_route("/v1/contexts/{context_id}", delete, methods=["DELETE"], dependencies=dependencies,
                         response_model=None, summary="Delete a compressed context")
