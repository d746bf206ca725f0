"""``kvgguf chat``: an interactive chat on the model's own chat template, shaped like llama.cpp's ``llama-cli``.

    kvgguf chat                                                   # the default model, no eviction
    kvgguf chat -m model.gguf -c 2048 --kv-eviction snapkv       # a conversation longer than its context
    kvgguf chat -sys "You are a terse assistant." -n 256 --temp 0.7

Type a message and press Enter; end a line with \\ to go on to the next one. The conversation stays in the KV cache
from turn to turn (only each turn's new tokens are decoded); once it outgrows -c cells, --kv-eviction frees the
cells its policy scores least important and the conversation goes on. Without eviction, a turn that would not fit
is refused, and /clear starts a new conversation.

As in a shell: Ctrl-C stops an answer being generated, or discards the line being typed; Ctrl-D on an empty line
ends the chat. --verbose writes each turn's tokens and the KV-cache statistics on stderr as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from types import FrameType
from typing import Any

from .conversation import Conversation
from .run import (add_eviction_arguments, add_model_arguments, add_sampling_arguments, check_arguments, load_model,
                  sampling_kwargs)

PROMPT = "> "
CONTINUATION_PROMPT = ". "
CLEAR_COMMAND = "/clear"


def read_message() -> str:
    """One message from the terminal: lines ending in a backslash go on. EOFError on Ctrl-D, KeyboardInterrupt
    on Ctrl-C (the partial message is dropped)."""
    lines = [input(PROMPT)]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input(CONTINUATION_PROMPT))
    return "\n".join(lines)


def answer(conversation: Conversation, message: str, args: argparse.Namespace) -> None:
    """Stream the answer to ``message``; Ctrl-C while it is generated stops it after the current token."""
    interrupted = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        interrupted = True

    # (not KeyboardInterrupt: raised between two Python lines, it could leave the cache half updated)
    previous = signal.signal(signal.SIGINT, stop)
    try:
        sampling = sampling_kwargs(args)
        sampling["temp"] = sampling.pop("temperature")
        for text in conversation.send(message, max_tokens=args.n_predict if args.n_predict > 0 else None,
                                      should_stop=lambda: interrupted, **sampling):
            sys.stdout.write(text)
            sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.stdout.write("\n")
        sys.stdout.flush()


def report(conversation: Conversation) -> dict[str, Any]:
    stats = conversation.llm.kv_stats()
    stats.pop("history", None)
    return {**conversation.last_turn, "kv": stats}


def main(args: argparse.Namespace) -> int:
    check_arguments(args)
    if args.n_predict < -1 or args.n_predict == 0:
        raise ValueError(f"-n must be >= 1, or -1 for no limit, got {args.n_predict}")
    llm = load_model(args)
    try:
        if "tokenizer.chat_template" not in llm.metadata:
            raise ValueError(f"{llm.model_path}: the model file has no chat template (tokenizer.chat_template)")
        conversation = Conversation(llm, system=args.system)
        if sys.stdin.isatty():
            import readline  # noqa: F401  (line editing and history for input())
        print(f"kvgguf chat: {llm.metadata.get('general.name', llm.model_path)}, {conversation.n_ctx} cells, "
              f"eviction {args.kv_eviction or 'off'}. Ctrl-C stops an answer, Ctrl-D ends, {CLEAR_COMMAND} starts "
              "over.", file=sys.stderr)
        while True:
            try:
                message = read_message()
            except EOFError:
                sys.stdout.write("\n")
                return 0
            except KeyboardInterrupt:
                sys.stdout.write("\n")
                continue
            if not message.strip():
                continue
            if message.strip() == CLEAR_COMMAND:
                conversation.clear()
                continue
            try:
                answer(conversation, message, args)
            except ValueError as error:  # a turn that does not fit: the conversation is as it was
                print(f"kvgguf chat: error: {error}", file=sys.stderr)
                continue
            if args.report:
                print(json.dumps(report(conversation), default=str), file=sys.stderr)
    finally:
        llm.close()


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "chat", help="an interactive chat on the model's chat template; eviction lets it outgrow the context",
        description=__doc__.replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("-sys", "--system", help="a system prompt (default: the chat template's own, if any)")
    parser.add_argument("-n", "--n-predict", type=int, default=-1, metavar="N",
                        help="most tokens per answer; -1: until the end of the answer (default -1)")
    parser.add_argument("--verbose", action="store_true", dest="report",
                        help="each turn's tokens and KV-cache statistics on stderr (one JSON line)")
    add_sampling_arguments(parser)
    add_eviction_arguments(parser)
    parser.set_defaults(run=main)
