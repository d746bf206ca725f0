"""``kvgguf compress`` and ``kvgguf ask``: compress a document's KV cache once into a ``.kvc`` file, then answer
questions from the file without reading the document again.

    kvgguf compress report.txt -o report.kvc --kv-keep 0.3        # KVzip, query-agnostic (the default)
    kvgguf ask report.kvc "What was the revenue in 2023?"
    kvgguf ask report.kvc "Who signed it?" -n 64 --temp 0

``compress`` shows a progress bar per stage (the prefill, then the policy's scoring: KVzip's reconstruction) on
stderr and writes one line about the result to stdout. A ``.kvc`` file records the model it was made with;
``ask`` with another model is refused by name.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from .run import add_model_arguments, add_sampling_arguments, check_arguments, load_model, sampling_kwargs

logger = logging.getLogger(__name__)


class StageBars:
    """One tqdm bar per stage of a compression, on stderr: a ``ProgressCallback``."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="tok", file=sys.stderr, leave=True)
        elif done < bar.n or total != bar.total:  # a new round of the stage (a long document is scored in pieces)
            bar.reset(total=total)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def compress_main(args: argparse.Namespace) -> int:
    check_arguments(args)
    document = Path(args.document)
    if not document.is_file():
        raise ValueError(f"{args.document!r}: no such file")
    text = document.read_text(encoding="utf-8")
    llm = load_model(args, eviction=False)  # the policy, keep and budget are compress()'s own arguments
    bars = StageBars()
    try:
        context = llm.compress(text, keep=args.kv_keep, budget=args.kv_budget, system=args.system,
                               policy=args.policy, progress=bars)
    finally:
        bars.close()
    try:
        path = context.save(args.output)
        full = context.n_tokens * llm.kv_stats()["bytes_per_cell"]
        kept = len(context.state)  # the K/V the compressed cache holds (every tier's cells), with its metadata
        target = f"keep {context.keep}" if context.budget is None else f"budget {context.budget}"
        print(f"{path}: {context.n_tokens} tokens, {context.policy} ({target}): {kept / 2**20:.1f} MiB of cache "
              f"state, {kept / full:.0%} of the {full / 2**20:.1f} MiB of K/V a full cache holds")
    finally:
        llm.close()
    return 0


def ask_main(args: argparse.Namespace) -> int:
    check_arguments(args)
    if not Path(args.context).is_file():
        raise ValueError(f"{args.context!r}: no such file")
    if args.n_predict < 1:
        raise ValueError(f"-n must be >= 1, got {args.n_predict}")
    llm = load_model(args, eviction=False)  # the context's own eviction is in its file
    try:
        context = llm.load_context(args.context)
        answer = llm.ask(context, args.question, max_tokens=args.n_predict, seed=args.seed,
                         **sampling_kwargs(args))
        print(answer)
    finally:
        llm.close()
    return 0


def add_parsers(commands: Any) -> None:
    compress = commands.add_parser(
        "compress", help="compress a document's KV cache into a .kvc file (KVzip by default)",
        description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    compress.add_argument("document", help="a text file")
    compress.add_argument("-o", "--output", required=True, help="the .kvc file to write")
    add_model_arguments(compress)
    compress.add_argument("--policy", "--kv-eviction", dest="policy", default=None, metavar="POLICY",
                          help="a prompt policy: kvzip (default, query-agnostic), snapkv, streaming, kvzip-head, ...")
    compress.add_argument("--kv-keep", type=float, metavar="R", help="fraction of the context's cells kept "
                          "(default 0.5)")
    compress.add_argument("--kv-budget", type=int, metavar="N", help="cells kept (instead of --kv-keep)")
    compress.add_argument("--system", help="a system prompt before the document (chat models)")
    compress.set_defaults(run=compress_main, seed=None)

    ask = commands.add_parser(
        "ask", help="answer a question from a .kvc file made by 'kvgguf compress'",
        description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    ask.add_argument("context", help="a .kvc file")
    ask.add_argument("question")
    add_model_arguments(ask)
    ask.add_argument("-n", "--n-predict", type=int, default=256, metavar="N",
                     help="most tokens in the answer (default 256)")
    add_sampling_arguments(ask)
    ask.set_defaults(run=ask_main)
