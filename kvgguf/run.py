"""``kvgguf run``: a streamed completion with KV-cache eviction, shaped like llama.cpp's ``llama-completion``.

    kvgguf run -p "Once upon a time" -n 128                       # the default model, no eviction
    kvgguf run -m model.gguf -f doc.txt --kv-eviction snapkv --kv-keep 0.3 -n 64
    kvgguf run -c 2048 --kv-eviction lazy --kv-budget 1024 -n 8192 -p "..."   # a long generation in bounded memory

The completion goes to stdout as it is generated; ``--verbose`` adds the timings and the KV-cache statistics
(``Llama.kv_stats()``) on stderr as one JSON line. Ctrl-C stops the generation and exits with 130.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .models import MODEL_HELP

logger = logging.getLogger(__name__)


def add_eviction_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--kv-*`` options, named after ``Llama``'s ``kv_*`` arguments (see README "Settings")."""
    group = parser.add_argument_group("KV-cache eviction (defaults: Llama's)")
    group.add_argument("--kv-eviction", metavar="POLICY",
                       help="policy name, or a '<prompt policy>+<decode-time policy>' pair (off when absent)")
    group.add_argument("--kv-keep", type=float, metavar="R", help="fraction of the evictable prompt cells kept")
    group.add_argument("--kv-budget", type=int, metavar="N", help="cells kept (instead of --kv-keep)")
    group.add_argument("--kv-window", type=int, metavar="N", help="recent cells never evicted")
    group.add_argument("--kv-sink", type=int, metavar="N", help="first cells never evicted")
    group.add_argument("--kv-granularity", choices=["head", "token"], help="per KV head or per token")
    group.add_argument("--kv-evict-every", type=int, metavar="N",
                       help="decode-time policies: back to the budget every N generated tokens")
    group.add_argument("--kv-lazy-window", type=int, metavar="W", help="LazyEviction's window")
    group.add_argument("--kv-lazy-alpha", type=float, metavar="A", help="LazyEviction's attention threshold")
    group.add_argument("--kv-lookahead", metavar="PATH", help="a LookaheadKV module (GGUF) for --kv-eviction lookahead")


def eviction_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``Llama`` keyword arguments for the ``--kv-*`` options that were given."""
    names = ("kv_eviction", "kv_keep", "kv_budget", "kv_window", "kv_sink", "kv_granularity", "kv_evict_every",
             "kv_lazy_window", "kv_lazy_alpha", "kv_lookahead")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and context options as llama.cpp's tools name them."""
    parser.add_argument("-m", "--model", help=MODEL_HELP)
    parser.add_argument("-c", "--ctx-size", type=int, default=4096, metavar="N", help="context size (default 4096)")
    parser.add_argument("-b", "--batch-size", type=int, default=512, metavar="N",
                        help="tokens per decode call (default 512)")
    parser.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                        help="CPU threads (default: llama-cpp-python's)")
    parser.add_argument("-ngl", "--gpu-layers", type=int, default=None, metavar="N",
                        help="layers offloaded to the GPU of a CUDA or Metal build, or to --rpc servers (default: "
                             "$LLAMA_ARG_N_GPU_LAYERS, else 0)")
    parser.add_argument("-fa", "--flash-attn", action="store_true", help="flash attention")
    parser.add_argument("--rpc", metavar="HOST:PORT,...", help="llama.cpp RPC servers (`kvgguf rpc-server` on other "
                        "hosts): -ngl layers are placed on them")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (llama.cpp's defaults)")
    group.add_argument("--temp", type=float, default=0.8, help="temperature; 0 is greedy (default 0.8)")
    group.add_argument("--top-k", type=int, default=40, help="default 40")
    group.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    group.add_argument("--min-p", type=float, default=0.05, help="default 0.05")
    group.add_argument("--repeat-penalty", type=float, default=1.0, help="default 1.0 (off)")
    group.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: random)")


def load_model(args: argparse.Namespace, eviction: bool = True) -> Any:
    """The ``Llama`` that the model, context and (with ``eviction``) ``--kv-*`` options describe."""
    from . import Llama
    from .models import resolve_model

    model = resolve_model(args.model)
    llama_args: dict[str, Any] = {"n_ctx": args.ctx_size, "n_batch": args.batch_size, "flash_attn": args.flash_attn,
                                  "verbose": False}
    if args.gpu_layers is not None:
        llama_args["n_gpu_layers"] = args.gpu_layers
    if args.threads is not None:
        llama_args.update(n_threads=args.threads, n_threads_batch=args.threads)
    if args.seed is not None:
        llama_args["seed"] = args.seed
    if getattr(args, "rpc", None):
        llama_args["rpc_servers"] = args.rpc
    return Llama(str(model), **llama_args, **(eviction_kwargs(args) if eviction else {}))


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "repeat_penalty": args.repeat_penalty}


def check_arguments(args: argparse.Namespace) -> None:
    """The model, context and (where the command has them) sampling options, named when out of range."""
    for name, value, least in (("--ctx-size", args.ctx_size, 1), ("--batch-size", args.batch_size, 1),
                               ("--threads", args.threads, 1), ("--top-k", getattr(args, "top_k", None), 0)):
        if value is not None and value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if getattr(args, "temp", 0.0) < 0:
        raise ValueError(f"--temp must be >= 0, got {args.temp}")
    for name, value in (("--top-p", getattr(args, "top_p", None)), ("--min-p", getattr(args, "min_p", None))):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")


def read_prompt(args: argparse.Namespace) -> str:
    if (args.prompt is None) == (args.file is None):
        raise ValueError("give the prompt with -p TEXT or -f FILE (one of them)")
    if args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise ValueError(f"-f {args.file!r}: no such file")
        return path.read_text(encoding="utf-8")
    return args.prompt


def end_of_generation_tokens(llm: Any) -> list[int]:
    """Every token that ends a generation (end of sequence, end of turn, ...)."""
    from ._native import llama_cpp_api

    vocab = llama_cpp_api.llama_model_get_vocab(llm.model)
    return [token for token in range(llama_cpp_api.llama_vocab_n_tokens(vocab))
            if llama_cpp_api.llama_vocab_is_eog(vocab, token)]


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    if args.n_predict < -1:
        raise ValueError(f"-n must be >= -1 (-1: to the end of generation), got {args.n_predict}")
    prompt = read_prompt(args)
    llm = load_model(args)
    from llama_cpp import LogitsProcessorList  # (after kvgguf's Llama: llama_cpp loads kvgguf's library)

    try:
        if args.chat:
            from .chat import chat_prompt_tokens

            tokens = chat_prompt_tokens(llm, [{"role": "user", "content": prompt}])
        else:
            tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        start = time.perf_counter()
        n_sampled = 0
        first_at = None
        finish_reason = None

        never = end_of_generation_tokens(llm) if args.ignore_eos else []

        # called once per sampled token. (Not logit_bias for --ignore-eos: llama-cpp-python 0.3.36 drops both
        # logit_bias and logits_processor when given the two, list.extend returning None.)
        def count_sampled(input_ids: Any, scores: Any) -> Any:
            nonlocal n_sampled
            n_sampled += 1
            scores[never] = -np.inf
            return scores

        try:
            stream = llm.create_completion(tokens, max_tokens=args.n_predict if args.n_predict >= 0 else None,
                                           stream=True, seed=args.seed,
                                           logits_processor=LogitsProcessorList([count_sampled]),
                                           **sampling_kwargs(args))
            for chunk in stream:  # a chunk per token, but tokens of one multi-byte character come together
                choice = chunk["choices"][0]
                if first_at is None:
                    first_at = time.perf_counter()
                finish_reason = choice["finish_reason"] or finish_reason
                sys.stdout.write(choice["text"])
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            return 130
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.report:
            end = time.perf_counter()
            decode_s = end - first_at if first_at is not None else 0.0
            # an end of generation was sampled, not generated ("stop": run sets no stop strings)
            n_generated = n_sampled - (1 if finish_reason == "stop" else 0)
            report = {"prompt_tokens": len(tokens), "generated_tokens": n_generated,
                      "prompt_s": round((first_at or end) - start, 3), "decode_s": round(decode_s, 3),
                      "kv": llm.kv_stats()}
            print(json.dumps(report, default=str), file=sys.stderr)
    finally:
        llm.close()
    return 0


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "run", help="a streamed completion with KV-cache eviction (llama-completion's options, plus --kv-*)",
        description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("-p", "--prompt", help="the prompt text")
    parser.add_argument("-f", "--file", help="a file whose text is the prompt")
    parser.add_argument("-n", "--n-predict", type=int, default=-1, metavar="N",
                        help="tokens to generate; -1: until the end of generation or a full context (default -1)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="never sample an end-of-generation token: generate all -n tokens")
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as one user turn through the model's chat template")
    parser.add_argument("--verbose", action="store_true", dest="report",
                        help="timings and KV-cache statistics on stderr (one JSON line)")
    add_sampling_arguments(parser)
    add_eviction_arguments(parser)
    parser.set_defaults(run=main)
