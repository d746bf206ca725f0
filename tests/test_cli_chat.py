"""``kvgguf chat`` and the ``Conversation`` under it, on the default model: each turn decodes only its new tokens and
answers as ``create_chat_completion`` does on the whole conversation; with eviction a conversation outgrows its
context and still answers right; without, a turn that does not fit is refused and the conversation goes on. In a
pseudo-terminal, Ctrl-C stops an answer or drops a half-typed line and Ctrl-D ends the chat, as in a shell."""
from __future__ import annotations

import json
import os
import pty
import random
import select
import sys
import time

import pytest

from kvgguf import Llama
from kvgguf.cli import main
from kvgguf.conversation import Conversation, ConversationFull
from kvgguf.text import haystack
from readme_commands import readme_commands
from tiny_models import write_tiny_alibi_model

GREEDY = {"temp": 0.0, "top_k": 1, "repeat_penalty": 1.0}
REPORT_START = b'{"new_tokens": '  # how a --verbose line starts
QUESTION = "\n\nQuestion: What is the secret code for the vault? Answer with the number."


def test_each_turn_decodes_only_its_new_tokens_and_answers_as_the_api(model_path):
    questions = ["What is the capital of France?", "And the capital of Italy?", "Name a famous dish from each."]
    llm = Llama(model_path, n_ctx=1024, n_threads=2, verbose=False)
    reference = Llama(model_path, n_ctx=1024, n_threads=2, verbose=False)
    try:
        conversation = Conversation(llm)
        messages: list[dict[str, str]] = []
        for turn, question in enumerate(questions):
            answer = "".join(conversation.send(question, max_tokens=40, **GREEDY))
            messages.append({"role": "user", "content": question})
            expected = reference.create_chat_completion(messages, max_tokens=40, temperature=0)
            assert answer == expected["choices"][0]["message"]["content"] != ""
            messages.append({"role": "assistant", "content": answer})
            assert conversation.messages == messages
            assert conversation.last_turn["rebuilt"] == (turn == 0)
            if turn:  # the end of the last answer and the new user turn, not the conversation again
                assert conversation.last_turn["new_tokens"] < 0.5 * expected["usage"]["prompt_tokens"]
            assert llm.n_tokens == expected["usage"]["prompt_tokens"] + conversation.last_turn["answer_tokens"]
    finally:
        llm.close()
        reference.close()


def vault_conversation(llm: Llama, seed: int, n_turns: int = 6) -> int:
    """A conversation of ``n_turns`` turns, each a document with its own vault code and the question; returns how
    many answers name their turn's code."""
    rng = random.Random(seed)
    conversation = Conversation(llm)
    right = 0
    for turn in range(n_turns):
        code = rng.randint(1000, 9999)
        text = haystack(rng.randint(6, 12), seed=seed * 10 + turn) + f" The secret code for the vault is {code}."
        right += str(code) in "".join(conversation.send(text + QUESTION, max_tokens=16, **GREEDY))
    return right


@pytest.mark.parametrize("policy", ["snapkv", "h2o"])
def test_a_conversation_outgrows_its_context_with_eviction(model_path, policy):
    """Six turns of ~230 tokens in 512 cells. Measured over 6 conversations (seeds 0-5, 36 answers): 36/36 right
    for snapkv and for h2o, and 24/24 (seeds 0-3) with the whole conversation in 4096 cells; here 2 conversations
    (12 answers), at least 11 right."""
    right = 0
    for seed in range(2):
        llm = Llama(model_path, n_ctx=512, n_threads=2, verbose=False, kv_eviction=policy)
        try:
            right += vault_conversation(llm, seed)
            stats = llm.kv_stats()
            assert llm.n_tokens > 2 * 512 and stats["evictions"] > 0
            assert stats["cells_now"] == len(llm.kv_positions()) <= 512  # the rest of the conversation is gone
        finally:
            llm.close()
    assert right >= 11


def test_a_turn_that_does_not_fit_without_eviction_is_refused_and_the_conversation_goes_on(model_path):
    llm = Llama(model_path, n_ctx=256, n_threads=2, verbose=False)
    reference = Llama(model_path, n_ctx=256, n_threads=2, verbose=False)
    try:
        conversation = Conversation(llm)
        first = "".join(conversation.send("Name a color.", max_tokens=8, **GREEDY))
        before = list(conversation.messages), llm.n_tokens
        with pytest.raises(ConversationFull, match=r"this turn needs \d+ cells, the context has 256"):
            list(conversation.send(haystack(30), max_tokens=8, **GREEDY))
        assert (conversation.messages, llm.n_tokens) == before
        second = "".join(conversation.send("Name another one.", max_tokens=8, **GREEDY))
        assert conversation.last_turn["rebuilt"] is False
        messages = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "Name another one."}]
        assert second == reference.create_chat_completion(messages, max_tokens=8, temperature=0)[
            "choices"][0]["message"]["content"]
    finally:
        llm.close()
        reference.close()


class Terminal:
    """``kvgguf chat`` in a pseudo-terminal: what a user types goes through the terminal's line discipline, so
    Ctrl-C (0x03) is a SIGINT and Ctrl-D (0x04) an end of file, as in a shell."""

    def __init__(self, arguments: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the chat, the terminal its stdin, stdout and stderr
            os.execv(sys.executable, [sys.executable, "-m", "kvgguf", "chat", *arguments])
        self.output = b""

    def type(self, keys: bytes) -> None:
        """Type ``keys`` at a person's pace, half a second after what came before. (Typed within milliseconds of
        the prompt that follows a Ctrl-C, a line was sometimes dropped: 1 run in 4, with readline and without;
        at this pace, 0 in 12.)"""
        time.sleep(0.5)
        os.write(self.fd, keys)

    def _read_until(self, done, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, self.output.decode(errors="replace")
            if select.select([self.fd], [], [], 0.1)[0]:
                self.output += os.read(self.fd, 4096)

    def wait_for_prompt(self) -> None:
        """Read until a new prompt (after everything read so far)."""
        start = len(self.output)
        self._read_until(lambda: b"\n> " in self.output[max(0, start - 2):])

    def wait_for_report(self, count: int) -> None:
        """Read until the ``count``-th turn's --verbose line, then the prompt after it."""
        self._read_until(lambda: len(self.reports()) >= count)
        self._read_until(lambda: self.output.rpartition(REPORT_START)[2].find(b"\n> ") >= 0)

    def wait_for_answer(self, after: bytes, n_bytes: int = 20) -> None:
        """Read until ``n_bytes`` of an answer follow the last ``after`` (the echoed message)."""
        self._read_until(lambda: len(self.output.rpartition(after)[2]) >= n_bytes)

    def exit_status(self) -> int:
        while True:
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            self.output += data
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])

    def reports(self) -> list[dict]:
        """The complete --verbose lines so far."""
        lines = self.output.decode(errors="replace").split("\r\n")[:-1]
        return [json.loads(line) for line in lines if line.startswith(REPORT_START.decode())]


def test_chat_in_a_terminal(model_path):
    [arguments] = readme_commands("chat")  # chat -c 512 --kv-eviction snapkv
    arguments = arguments[1:] + ["-m", model_path, "-t", "2", "--temp", "0", "-n", "400", "--verbose"]
    terminal = Terminal(arguments)
    terminal.wait_for_prompt()
    terminal.type(b"What is the capital of France?\r")
    terminal.wait_for_report(1)
    terminal.type(b"a line I change my mind about")
    terminal.type(b"\x03")  # drops the line: nothing is sent
    terminal.wait_for_prompt()
    terminal.type(b"Write a long story about a dragon who collects clocks.\r")
    terminal.wait_for_answer(b"clocks.\r\n")
    terminal.type(b"\x03")  # stops the answer
    terminal.wait_for_report(2)
    terminal.type(b"\x04")
    assert terminal.exit_status() == 0
    first, story = terminal.reports()
    assert first["finish"] in ("stop", "length") and first["rebuilt"] is True
    assert story["finish"] == "interrupted" and 0 < story["answer_tokens"] < 400
    assert story["rebuilt"] is False  # the dropped line never reached the conversation, which went on

    # the first answer is the API's, with the same settings
    llm = Llama(model_path, n_ctx=512, n_threads=2, verbose=False, kv_eviction="snapkv")
    try:
        expected = "".join(Conversation(llm).send("What is the capital of France?", max_tokens=400, **GREEDY))
    finally:
        llm.close()
    text = terminal.output.decode(errors="replace").replace("\r\n", "\n")
    assert f"> What is the capital of France?\n{expected}\n" in text


@pytest.mark.parametrize("arguments,message", [
    (["-n", "0"], "-n must be >= 1, or -1 for no limit, got 0"),
    (["--kv-eviction", "snapkv", "--kv-keep", "1.5"], "kv_keep must be in"),
    (["--top-p", "2"], "--top-p must be in [0, 1], got 2.0"),
])
def test_bad_arguments_are_one_line(model_path, arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "-m", model_path, *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("kvgguf chat: error: ") and error.count("\n") == 1 and message in error


def test_a_model_without_a_chat_template_is_refused_by_name(tmp_path, capsys):
    path = write_tiny_alibi_model(tmp_path / "no-template.gguf")
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", "-m", path])
    assert exit_info.value.code == 2
    assert "no-template.gguf: the model file has no chat template" in capsys.readouterr().err
