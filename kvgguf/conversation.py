"""A multi-turn chat carried in one ``Llama``'s KV cache from turn to turn, as llama.cpp's ``llama-cli`` carries it.

Each turn decodes only what is new: the chat template's text for the whole conversation is formatted, and the part
after the text the cache already holds (the end of the last answer, the new user turn, the assistant's header) is
tokenized and decoded after it. Nothing is decoded twice, however long the conversation. The cache holds the
conversation whole until it outgrows the context; then the eviction policy frees the cells it scores least
important, a few at a time, as llama.cpp's context shift would drop the oldest (``EvictionController.eval``), and
the conversation goes on. Without a policy, a turn that would not fit is refused before anything is decoded
(:class:`ConversationFull`) and the conversation stays as it was.

When the template renders the history differently from what was decoded (a template that trims the answers, say),
the cache is rebuilt from the whole conversation for that turn.
"""
from __future__ import annotations

import codecs
import logging
from collections.abc import Callable, Iterator
from typing import Any

from ._native import llama_cpp_api

logger = logging.getLogger(__name__)


class ConversationFull(ValueError):
    """A turn would not fit the context and no eviction policy is set; nothing was decoded."""


class Conversation:
    """A chat with ``llm`` (a ``kvgguf.Llama``) on the model's own chat template, kept in its cache.

    ``send(text)`` adds a user turn and streams the answer; ``messages`` is the conversation so far (OpenAI
    style); ``last_turn`` says how the last answer went. The ``Llama`` must not be used for anything else while
    the conversation is on (any other call resets its cache; the next turn then rebuilds it)."""

    def __init__(self, llm: Any, system: str | None = None) -> None:
        self.llm = llm
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.last_turn: dict[str, Any] = {}
        self._cached_text: str | None = None  # the chat text the cache holds, as decoded; None: nothing
        self._vocab = llama_cpp_api.llama_model_get_vocab(llm.model)
        self.clear()

    @property
    def n_ctx(self) -> int:
        """Cells of the model's context."""
        return int(self.llm.kv_controller.n_ctx)

    @property
    def evicts(self) -> bool:
        return self.llm.kv_controller.policy is not None

    def clear(self) -> None:
        """Start a new conversation (the system prompt stays); the cache is emptied."""
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        self._cached_text = None
        self.llm.reset()

    def _new_tokens(self, prompt: str) -> tuple[list[int], bool]:
        """The tokens to decode for the conversation formatted as ``prompt``, and whether they continue the
        cache (False: the cache is rebuilt from the whole prompt)."""
        cached = self._cached_text
        continues = cached is not None and prompt.startswith(cached) and self.llm.n_tokens > 0
        if cached is not None and not continues:
            logger.info("the chat template renders the conversation unlike what the cache holds: rebuilding it")
        text = prompt[len(cached):] if continues and cached is not None else prompt
        return self.llm.tokenize(text.encode(), add_bos=False, special=True), continues

    def send(self, text: str, max_tokens: int | None = None, should_stop: Callable[[], bool] | None = None,
             **sampling: Any) -> Iterator[str]:
        """Add ``text`` as the user's turn and stream the answer's text as it is generated; the answer becomes the
        assistant's turn when the stream ends (at the end of generation, after ``max_tokens`` tokens, when
        ``should_stop()`` says so, or when a context without eviction is full). ``sampling`` is ``generate``'s
        (temp, top_k, top_p, min_p, repeat_penalty). ConversationFull, before anything is decoded, when the turn
        does not fit a context without eviction."""
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (or None), got {max_tokens}")
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = self.llm.chat_formatter()(messages=messages).prompt
        tokens, continues = self._new_tokens(prompt)
        n_held = self.llm.n_tokens if continues else 0
        if not self.evicts and n_held + len(tokens) + 1 > self.n_ctx:
            raise ConversationFull(f"this turn needs {n_held + len(tokens) + 1} cells, the context has {self.n_ctx}:"
                                   f" start a new conversation, or use a larger n_ctx or kv_eviction")
        self.last_turn = {"new_tokens": len(tokens), "rebuilt": not continues}
        if not continues:
            self.llm.reset()
        self._cached_text = None  # until the turn is decoded and its answer known
        answer: list[int] = []
        finish = "stop"
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # (a turn that outgrows the cache is decoded in pieces, each eviction making room for the next:
        # EvictionController.eval)
        generator = self.llm.generate(tokens, reset=False, **sampling)
        try:
            for token in generator:
                if llama_cpp_api.llama_vocab_is_eog(self._vocab, token):
                    break  # sampled, never decoded: the template's own end of turn follows in the next turn
                answer.append(token)
                piece_text = decoder.decode(self.llm._model.detokenize([token]))
                if piece_text:
                    yield piece_text
                if max_tokens is not None and len(answer) >= max_tokens:
                    finish = "length"
                elif not self.evicts and self.llm.n_tokens + 1 >= self.n_ctx:
                    finish = "context full"
                elif should_stop is not None and should_stop():
                    finish = "interrupted"
                if finish != "stop":
                    break
        finally:
            generator.close()
        if finish != "stop":
            self.llm.eval(answer[-1:])  # the last token was sampled, not yet decoded: the cache holds the answer
        tail_text = decoder.decode(b"", final=True)
        if tail_text:
            yield tail_text
        content = self.llm.detokenize(answer).decode("utf-8", errors="replace")
        self.messages = messages + [{"role": "assistant", "content": content}]
        self._cached_text = prompt + content
        self.last_turn.update(answer_tokens=len(answer), finish=finish, cells=self.llm.n_tokens)
