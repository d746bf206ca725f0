"""The model's chat template as eviction sees it: its formatter, the head of a user turn (protected, never
reconstructed), the end of a user turn (where a scoring request or a question closes it), and how a compressed
context sits inside a chat (``ChatLayout``)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ._native import llama_cpp, llama_cpp_api

CONTEXT_MARK = "\x00kvgguf-context\x00"  # stands where a context or a question goes when a chat is formatted


@dataclass(frozen=True)
class ChatLayout:
    """How questions join a context compressed inside a chat: the context is the start of a user turn.

    ``template_head`` is the chat template's text before the context (the system turn, the user header);
    questions follow the context in the same user turn after ``separator``."""

    template_head: str
    separator: str
    system: str | None


class ChatTemplate:
    """The chat template of one model (``tokenizer.chat_template`` in its GGUF file), tokenized once."""

    def __init__(self, llm: llama_cpp.Llama) -> None:
        self._llm = llm
        self._formatter: Jinja2ChatFormatter | None = None
        self._turn_end: list[int] | None = None
        self._default_head: list[int] | None = None

    @property
    def has_template(self) -> bool:
        return "tokenizer.chat_template" in self._llm.metadata

    def _tokenize(self, text: str, special: bool) -> list[int]:
        # llama-cpp-python's own tokenizer (kvgguf.Llama.tokenize hands a compressed context's tokens back)
        return llama_cpp.Llama.tokenize(self._llm, text.encode(), add_bos=False, special=special)

    def formatter(self) -> Jinja2ChatFormatter:
        """The model's own chat template; ValueError if the file has none."""
        if self._formatter is None:
            template = self._llm.metadata.get("tokenizer.chat_template")
            if template is None:
                raise ValueError("this GGUF file has no tokenizer.chat_template")
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=self._token_text(self._llm.token_eos()),
                                                  bos_token=self._token_text(self._llm.token_bos()))
        return self._formatter

    def _token_text(self, token: int) -> str:
        return self._llm._model.token_get_text(token) if token != -1 else ""

    def turn_end(self) -> list[int]:
        """The template's tokens after a user message up to the assistant's answer (end of the user turn,
        assistant header); a blank line without a template."""
        if self._turn_end is None:
            if self.has_template:
                prompt = self.formatter()(messages=[{"role": "user", "content": CONTEXT_MARK}]).prompt
                text = prompt[prompt.index(CONTEXT_MARK) + len(CONTEXT_MARK):]
            else:
                text = "\n\n"
            self._turn_end = self._tokenize(text, special=True)
        return self._turn_end

    def user_turn_head(self, system: str | None) -> tuple[ChatLayout, list[int]]:
        """The template's text and tokens before a user turn's content (after a system turn with ``system``;
        with None, the template's default)."""
        messages = [] if system is None else [{"role": "system", "content": system}]
        prompt = self.formatter()(messages=messages + [{"role": "user", "content": CONTEXT_MARK}]).prompt
        chat = ChatLayout(template_head=prompt[:prompt.index(CONTEXT_MARK)], separator="\n\n", system=system)
        return chat, self._tokenize(chat.template_head, special=True)

    def head_length(self, tokens: Sequence[int]) -> int:
        """How many of a prompt's first tokens are the head of a user turn with the template's default system
        prompt (kvpress's KVzip tells the context from the template the same way); 0 without a template."""
        if self._default_head is None:
            self._default_head = self.user_turn_head(None)[1] if self.has_template else []
        head = self._default_head
        return len(head) if head and list(tokens[:len(head)]) == head else 0


def chat_prompt_tokens(llm: llama_cpp.Llama, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The chat-formatted prompt of ``messages`` up to the assistant's header, as a chat completion decodes it."""
    text = llm.chat_formatter()(messages=list(messages)).prompt
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def greedy_tokens(llm: llama_cpp.Llama, prompt: Sequence[int], reset: bool = True) -> Iterator[int]:
    """The model's greedy tokens after ``prompt``, up to its end-of-generation token (not yielded). Take as many
    as wanted (``itertools.islice``): the token after the last one taken is never decoded."""
    vocab = llama_cpp_api.llama_model_get_vocab(llm.model)
    for token in llm.generate(list(prompt), reset=reset, temp=0.0, top_k=1, repeat_penalty=1.0):
        if llama_cpp_api.llama_vocab_is_eog(vocab, token):
            return
        yield token
