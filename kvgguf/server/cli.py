"""``kvgguf serve``: an OpenAI-compatible server (llama-cpp-python's) with KV-cache eviction per request and named
compressed contexts. Needs the ``[server]`` extra.

    kvgguf serve -m model.gguf --host 127.0.0.1 --port 8000
    kvgguf serve -c 8192 --kv-eviction snapkv --kv-keep 0.3        # eviction by default; requests may change it

Endpoints: /v1/completions and /v1/chat/completions (SSE streaming) with the fields kv_eviction, kv_keep, kv_budget,
kv_window and context; /v1/contexts (POST a document to compress it once; GET, DELETE); /v1/models. Each answer's
KV-cache statistics are in its usage.kv. Requests are served one at a time, in arrival order.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
from typing import Any

from ..run import add_eviction_arguments, add_model_arguments, check_arguments, eviction_kwargs

logger = logging.getLogger(__name__)

# what llama-cpp-python's server imports (its own [server] extra)
SERVER_MODULES = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def check_server_extra() -> None:
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"kvgguf serve needs {', '.join(missing)}: pip install 'kvgguf[server]' (or bash "
                          "scripts/install.sh server)")


def build_app(args: argparse.Namespace) -> Any:
    """The app that the options describe (the model loaded)."""
    check_arguments(args)
    check_server_extra()
    from llama_cpp.server.settings import ServerSettings

    from ..models import resolve_model
    from ..llama import gpu_layers_from_env
    from .app import KvModelSettings, create_app

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    model = resolve_model(args.model)
    threads = {} if args.threads is None else {"n_threads": args.threads, "n_threads_batch": args.threads}
    model_settings = KvModelSettings(model=str(model), model_alias=args.alias, n_ctx=args.ctx_size,
                                     n_batch=args.batch_size, n_ubatch=args.batch_size,
                                     n_gpu_layers=gpu_layers_from_env() if args.gpu_layers is None else args.gpu_layers,
                                     rpc_servers=args.rpc,
                                     flash_attn=args.flash_attn, logits_all=False, verbose=False,
                                     kv_defaults=eviction_kwargs(args), **threads)
    server_settings = ServerSettings(host=args.host, port=args.port, api_key=args.api_key, interrupt_requests=False)
    return create_app(model_settings, server_settings, args.contexts_dir)


def main(args: argparse.Namespace) -> int:
    app = build_app(args)
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "serve", help="an OpenAI-compatible server with eviction per request and compressed contexts "
                      "(extra [server])",
        description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="default %(default)s")
    parser.add_argument("--alias", help="the model's name in /v1/models and in responses (default: its path)")
    parser.add_argument("--api-key", help="require this bearer token")
    parser.add_argument("--contexts-dir", default="kvgguf-contexts",
                        help="where compressed contexts are kept (default %(default)s)")
    add_eviction_arguments(parser)
    parser.set_defaults(run=main)
