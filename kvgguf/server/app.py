"""The FastAPI app of ``kvgguf serve``: llama-cpp-python's app with its completion and chat routes replaced by ones
that take the ``kv_*`` and ``context`` fields, the ``/v1/contexts`` routes, and OpenAI-style 4xx errors.

llama-cpp-python's pieces used as they are: its settings classes, request models (subclassed with our fields),
``LlamaProxy`` (subclassed to load a ``kvgguf.Llama``), the locks behind ``get_llama_proxy``, the SSE publisher
``get_event_publisher``, ``prepare_request_resources`` (logit bias, grammar, min_tokens) and its other routes
(``/v1/models``, ``/v1/embeddings``, ``/extras/tokenize``, ...).
"""
from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import Any, Callable, Optional

import anyio
import llama_cpp
import llama_cpp.server.app as llama_app
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from llama_cpp.server.errors import RouteErrorHandler
from llama_cpp.server.model import LlamaProxy
from llama_cpp.server.settings import ModelSettings, ServerSettings
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette_context.middleware import RawContextMiddleware
from starlette_context.plugins import RequestIdPlugin

from ..settings import validate_settings
from .contexts import ContextStore, add_context_routes, not_found_error

logger = logging.getLogger(__name__)

# the eviction fields a request may set; absent ones take the server's defaults
REQUEST_KV_FIELDS = ("kv_eviction", "kv_keep", "kv_budget", "kv_window")
# Llama's settings that validate_settings checks (the others, such as kv_lookahead, are files Llama resolves)
_VALIDATED = ("kv_eviction", "kv_keep", "kv_budget", "kv_window", "kv_sink", "kv_granularity", "kv_evict_every",
              "kv_tiers", "kv_lazy_window", "kv_lazy_alpha")


class APIError(Exception):
    """A request the server refuses: the HTTP status and the OpenAI-style error's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _param_named(message: str, names: tuple[str, ...]) -> str | None:
    """The one of ``names`` that ``message`` mentions first (kvgguf's ValueErrors name the bad option first)."""
    mentioned = [(message.index(name), name) for name in names if name in message]
    return min(mentioned)[1] if mentioned else None


class KvRoute(RouteErrorHandler):
    """llama-cpp-python's error-handling route, with bad input answered as a 4xx with an OpenAI-style body:
    a body that is not valid JSON or not the request model, a bad kv value, an unknown context. Other errors go to
    llama-cpp-python's own handler (context length exceeded: 400; anything else: 500)."""

    def get_route_handler(self) -> Callable:
        handler = APIRoute.get_route_handler(self)
        fallback = super().get_route_handler()

        async def route(request: Request) -> Any:
            try:
                return await handler(request)
            except APIError as error:
                return error_response(error.status, error.message, error.param, error.code, error.kind)
            except HTTPException as error:
                kind = "authentication_error" if error.status_code == 401 else "invalid_request_error"
                return error_response(error.status_code, str(error.detail), kind=kind)
            except RequestValidationError as error:
                first = error.errors()[0]
                location = [str(part) for part in first.get("loc", ()) if part != "body"]
                if first.get("type") == "json_invalid":
                    return error_response(400, f"the request body is not valid JSON: {first.get('msg')}")
                param = ".".join(location) or None
                return error_response(400, f"{param or 'body'}: {first.get('msg')}", param=param)
            except ValueError as error:  # kvgguf's and llama-cpp-python's checks of the request's values
                message = str(error)
                if "exceed context window" in message:
                    return await fallback(request)  # llama-cpp-python's context_length_exceeded body
                return error_response(400, message, param=_param_named(message, REQUEST_KV_FIELDS + ("context",)))

        return route


class KvModelSettings(ModelSettings):
    """llama-cpp-python's model settings plus the eviction defaults of ``kvgguf serve --kv-*``."""

    kv_defaults: dict[str, Any] = Field(default_factory=dict,
                                        description="kvgguf.Llama's kv_* arguments for requests that set none")


class KvLlamaProxy(LlamaProxy):
    """llama-cpp-python's model proxy, loading a ``kvgguf.Llama``, which remembers the eviction settings it last
    applied (each request applies its own, reconfiguring only when they change)."""

    def __init__(self, models: list[ModelSettings]) -> None:
        super().__init__(models)
        self.applied: dict[str, Any] = dict(getattr(models[0], "kv_defaults", {}))
        self.kv_defaults = dict(self.applied)

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> llama_cpp.Llama:
        from ..llama import Llama

        if settings.cache:
            raise ValueError("cache=True is not supported: llama-cpp-python's prompt cache would restore states "
                             "that kvgguf's eviction does not know of")
        return Llama(settings.model, n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
                     n_threads=settings.n_threads, n_threads_batch=settings.n_threads_batch,
                     n_gpu_layers=settings.n_gpu_layers, flash_attn=settings.flash_attn, seed=settings.seed,
                     chat_format=settings.chat_format, logits_all=settings.logits_all, verbose=settings.verbose,
                     rpc_servers=settings.rpc_servers or None, **getattr(settings, "kv_defaults", {}))


class StreamOptions(BaseModel):
    include_usage: bool = False


class KvRequestFields(BaseModel):
    """The fields kvgguf adds to a completion or chat request."""

    kv_eviction: Optional[str] = Field(None, description="eviction policy for this request; null: none; absent: "
                                                         "the server's")
    kv_keep: Optional[float] = Field(None, description="fraction of the evictable prompt cells kept")
    kv_budget: Optional[int] = Field(None, description="cells kept (instead of kv_keep)")
    kv_window: Optional[int] = Field(None, description="recent cells never evicted")
    context: Optional[str] = Field(None, description="id of a compressed context (POST /v1/contexts) to answer from")
    stream_options: Optional[StreamOptions] = Field(None, description="include_usage: a last chunk with usage")


class KvCompletionRequest(CreateCompletionRequest, KvRequestFields):
    pass


class KvChatCompletionRequest(CreateChatCompletionRequest, KvRequestFields):
    pass


def requested_settings(body: KvRequestFields, defaults: dict[str, Any]) -> dict[str, Any]:
    """The eviction settings a request asks for, checked: a named policy (or null) replaces the server's default
    policy and its options; keep, budget or window alone adjust the default policy (a keep replaces a default
    budget and the other way round). APIError (400) naming the bad field."""
    given = {name: getattr(body, name) for name in REQUEST_KV_FIELDS if name in body.model_fields_set}
    if "kv_eviction" in given:
        wanted = {name: value for name, value in given.items() if value is not None or name == "kv_eviction"}
    else:
        wanted = dict(defaults)
        if given.get("kv_keep") is not None:
            wanted.pop("kv_budget", None)
        if given.get("kv_budget") is not None:
            wanted.pop("kv_keep", None)
        wanted.update({name: value for name, value in given.items() if value is not None})
    try:
        validate_settings(**{"kv_eviction": None,
                             **{name: value for name, value in wanted.items() if name in _VALIDATED}})
    except ValueError as error:
        message = str(error)
        # the request's own field where the message names it (among others it may list), else the first named
        param = _param_named(message, tuple(given)) or _param_named(message, REQUEST_KV_FIELDS)
        raise APIError(400, message, param=param) from None
    return wanted


def apply_settings(proxy: KvLlamaProxy, llama: Any, wanted: dict[str, Any]) -> None:
    """Configure the model's eviction for a request (under the model's lock), only when it changes: a change
    resets the cache."""
    if proxy.applied != wanted:
        llama.configure_kv_eviction(**{"kv_eviction": None, **wanted})
        proxy.applied = dict(wanted)


_COUNTERS = ("evictions", "cells_freed", "bytes_freed")


def kv_counters(llama: Any) -> dict[str, int]:
    """The model's eviction counters so far (over its life, whichever cache evicted)."""
    stats = llama.kv_stats()
    return {name: stats[name] for name in _COUNTERS}


def kv_usage(llama: Any, before: dict[str, int]) -> dict[str, Any]:
    """The KV-cache statistics of one answer: its evictions and what they freed (the counters against
    ``before``), and the cache as it ends."""
    after = llama.kv_stats()
    return {"policy": after["policy"], **{name: after[name] - before[name] for name in _COUNTERS},
            "cells_now": after["cells_now"], "kv_bytes_now": after["kv_bytes_now"],
            "kv_bytes_allocated": after["kv_bytes_allocated"]}


def answer(llama: Any, *, method: str, proxy: KvLlamaProxy, wanted: dict[str, Any], context: Any,
           include_usage: bool, **kwargs: Any) -> Any:
    """Run one completion or chat request on the model (under its lock): its eviction settings, then the call,
    with the KV statistics in ``usage.kv`` (streamed: a last chunk with the usage, when asked for)."""
    apply_settings(proxy, llama, wanted)
    before = kv_counters(llama)
    call = getattr(llama, method)
    result = call(**kwargs, context=context) if context is not None else call(**kwargs)
    if not kwargs.get("stream"):
        result["usage"]["kv"] = kv_usage(llama, before)
        return result

    def stream() -> Any:
        last = None
        n_chunks = 0
        for chunk in result:
            last = chunk
            n_chunks += 1
            yield chunk
        if include_usage and last is not None:
            yield {"id": last["id"], "object": last["object"], "created": last["created"], "model": last["model"],
                   "choices": [], "usage": {"completion_chunks": n_chunks, "kv": kv_usage(llama, before)}}

    return stream()


def _completion_route(router: APIRouter, store: ContextStore, path: str, request_model: type,
                      method: str, exclude: set[str]) -> None:
    async def endpoint(request: Request, body: Any) -> Any:
        if method == "create_completion" and isinstance(body.prompt, list):
            if len(body.prompt) > 1:
                raise APIError(400, "one prompt per request", param="prompt")
            body.prompt = body.prompt[0] if body.prompt else ""
        proxy = llama_app._llama_proxy
        wanted = requested_settings(body, proxy.kv_defaults if isinstance(proxy, KvLlamaProxy) else {})
        kwargs = body.model_dump(exclude=exclude | {"context", "stream_options", *REQUEST_KV_FIELDS})
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        context = None
        if body.context is not None:
            async with contextlib.asynccontextmanager(llama_app.get_llama_proxy)() as locked:
                context = await run_in_threadpool(store.load, body.context, locked(body.model))
        call = partial(answer, method=method, proxy=proxy, wanted=wanted, context=context,
                       include_usage=include_usage)
        if kwargs.get("stream", False):
            send_chan, recv_chan = anyio.create_memory_object_stream(10)
            return EventSourceResponse(
                recv_chan, data_sender_callable=partial(
                    llama_app.get_event_publisher, request=request, inner_send_chan=send_chan, body=body,
                    body_model=body.model, llama_call=call, kwargs=kwargs),
                sep="\n", ping_message_factory=llama_app._ping_message_factory)
        async with contextlib.asynccontextmanager(llama_app.get_llama_proxy)() as locked:
            llama = llama_app.prepare_request_resources(body, locked, body.model, kwargs)
            return await run_in_threadpool(call, llama, **kwargs)

    # (the request model is this route's: set as an object, since this module's annotations are strings)
    endpoint.__annotations__.update(request=Request, body=request_model)
    router.add_api_route(path, endpoint, methods=["POST"], response_model=None,
                         dependencies=[Depends(llama_app.authenticate)], tags=[llama_app.openai_v1_tag])


REPLACED_PATHS = {"/v1/completions", "/v1/chat/completions"}


def create_app(model_settings: KvModelSettings, server_settings: ServerSettings, contexts_dir: str) -> FastAPI:
    """The app serving one ``kvgguf.Llama`` (loaded here) with compressed contexts kept in ``contexts_dir``."""
    llama_app.set_server_settings(server_settings)
    app = FastAPI(middleware=[Middleware(RawContextMiddleware, plugins=(RequestIdPlugin(),))],
                  title="kvgguf: llama.cpp with KV-cache eviction, OpenAI API", version="0.1.0",
                  root_path=server_settings.root_path)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])
    store = ContextStore(contexts_dir, not_found_error(APIError))
    router = APIRouter(route_class=KvRoute)
    _completion_route(router, store, "/v1/completions", KvCompletionRequest, "create_completion",
                      {"n", "best_of", "logit_bias_type", "user", "min_tokens"})
    _completion_route(router, store, "/v1/chat/completions", KvChatCompletionRequest, "create_chat_completion",
                      {"n", "logit_bias_type", "user", "min_tokens"})
    add_context_routes(router, store, APIError,
                       lambda proxy, llama: apply_settings(proxy, llama, proxy.kv_defaults))
    app.include_router(router)
    app.router.routes.extend(route for route in llama_app.router.routes
                             if getattr(route, "path", None) not in REPLACED_PATHS)
    previous, llama_app._llama_proxy = llama_app._llama_proxy, None
    if previous is not None:  # an app made before in this process (a test's): its model is closed, once
        previous.free()
    llama_app._llama_proxy = KvLlamaProxy(models=[model_settings])
    app.state.contexts = store
    return app

