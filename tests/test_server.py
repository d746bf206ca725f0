"""``kvgguf serve`` on loopback, through the real ``openai`` client and curl: per-request eviction, named compressed
contexts that survive a restart, streaming, concurrent requests that never mix, and bad input answered with a 4xx
and an OpenAI-style body while the server goes on serving."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from kvgguf import Llama  # noqa: E402
from kvgguf.server import cli as serve_cli  # noqa: E402
from kvgguf.text import haystack  # noqa: E402
from readme_commands import README, readme_commands  # noqa: E402

N_CTX = 2048
DOCUMENT = haystack(40, seed=5) + " The secret code for the vault is 4821. " + haystack(20, seed=6)
QUESTION = "What is the secret code for the vault?"
# what the server's request models default to and create_completion does not (repeat_penalty 1.1), for references
try:
    from llama_cpp.server.types import CreateCompletionRequest
    SERVER_DEFAULTS = {"repeat_penalty": CreateCompletionRequest.model_fields["repeat_penalty"].default}
except ImportError:  # without the server extra, the module is skipped
    SERVER_DEFAULTS = {}


class Server:
    """``kvgguf serve`` with ``arguments``, in a thread of this process, on a free loopback port."""

    def __init__(self, arguments: list[str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        parser = argparse.ArgumentParser()
        serve_cli.add_parser(parser.add_subparsers())
        args = parser.parse_args(["serve", *arguments, "--port", str(self.port)])
        self.server = uvicorn.Server(uvicorn.Config(serve_cli.build_app(args), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=300)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def contexts_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("contexts")


@pytest.fixture(scope="module")
def server(model_path, contexts_dir):
    running = Server(["-m", model_path, "-c", str(N_CTX), "-t", "2", "--alias", "smollm2",
                      "--contexts-dir", str(contexts_dir)])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def reference(model_path):
    """A kvgguf.Llama with the server's context parameters, for the answers a request should get."""
    llm = Llama(model_path, n_ctx=N_CTX, n_batch=512, n_ubatch=512, n_threads=2, verbose=False)
    yield llm
    llm.close()


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def test_models_lists_the_served_model(server):
    assert [model.id for model in server.client.models.list().data] == ["smollm2"]


def test_a_request_evicts_with_its_own_settings_and_answers_as_the_api(server, reference):
    messages = chat(f"{DOCUMENT}\n\n{QUESTION}")
    out = server.client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                                extra_body={"kv_eviction": "snapkv", "kv_keep": 0.3})
    kv = out.usage.model_extra["kv"]
    assert kv["policy"] == "snapkv" and kv["evictions"] == 1 and kv["cells_freed"] > 0.5 * out.usage.prompt_tokens
    reference.configure_kv_eviction("snapkv", kv_keep=0.3)
    expected = reference.create_chat_completion(messages, max_tokens=24, temperature=0, **SERVER_DEFAULTS)
    assert out.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert "4821" in out.choices[0].message.content
    # the next request without kv fields is the server's default again: no eviction
    plain = server.client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8,
                                             temperature=0)
    assert plain.usage.model_extra["kv"]["policy"] is None and plain.usage.model_extra["kv"]["evictions"] == 0
    reference.configure_kv_eviction(None)
    assert plain.choices[0].text == reference.create_completion("The capital of France is", max_tokens=8,
                                                                temperature=0, **SERVER_DEFAULTS)["choices"][0]["text"]


def test_streamed_chat_is_the_whole_answer_and_ends_with_the_kv_usage(server):
    arguments = dict(model="smollm2", messages=chat(f"{DOCUMENT}\n\n{QUESTION}"), max_tokens=24, temperature=0,
                     extra_body={"kv_eviction": "streaming", "kv_keep": 0.5})
    whole = server.client.chat.completions.create(**arguments).choices[0].message.content
    chunks = list(server.client.chat.completions.create(**arguments, stream=True,
                                                        stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.model_extra["kv"]["evictions"] == 1


def create_context(url: str, **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/contexts", json=fields, timeout=300)


def test_a_named_context_is_compressed_once_and_answers_as_the_api(server, reference):
    created = create_context(server.url, document=DOCUMENT, kv_keep=0.3)  # KVzip, the default
    assert created.status_code == 200
    info = created.json()
    assert info["object"] == "context" and info["policy"] == "kvzip" and info["keep"] == 0.3
    assert info["state_bytes"] < 0.5 * info["full_cache_bytes"]
    context_id = info["id"]
    assert httpx.get(f"{server.url}/v1/contexts/{context_id}").json() == info
    assert info in httpx.get(f"{server.url}/v1/contexts").json()["data"]

    answer = server.client.chat.completions.create(model="smollm2", messages=chat(QUESTION), max_tokens=16,
                                                   temperature=0, extra_body={"context": context_id})
    text = server.client.completions.create(model="smollm2", prompt=QUESTION, max_tokens=16, temperature=0,
                                            extra_body={"context": context_id})
    reference.configure_kv_eviction(None)
    compressed = reference.compress(DOCUMENT, keep=0.3)
    expected = reference.create_chat_completion(chat(QUESTION), context=compressed, max_tokens=16, temperature=0,
                                               **SERVER_DEFAULTS)
    assert answer.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert text.choices[0].text == answer.choices[0].message.content and "4821" in text.choices[0].text
    # the answer started from the compressed cache: the document was not decoded again, nothing was evicted
    assert answer.usage.model_extra["kv"]["kv_bytes_now"] < 0.5 * info["full_cache_bytes"]
    assert answer.usage.model_extra["kv"]["evictions"] == 0 == text.usage.model_extra["kv"]["evictions"]


@pytest.mark.parametrize("body,status,param,message", [
    ({"messages": chat("hi"), "kv_eviction": "snapkvv"}, 400, "kv_eviction", "unknown kv_eviction policy 'snapkvv'"),
    ({"messages": chat("hi"), "kv_eviction": "snapkv", "kv_keep": 1.5}, 400, "kv_keep", "kv_keep must be in (0, 1]"),
    ({"messages": chat("hi"), "kv_keep": "half"}, 400, "kv_keep", "valid number"),
    ({"messages": chat("hi"), "kv_budget": 100}, 400, "kv_budget", "need a kv_eviction policy"),
    ({"messages": chat("hi"), "context": "ctx-0123456789abcdef"}, 404, "context", "no context 'ctx-0123456789abcdef'"),
    ({"messages": chat("hi"), "context": "../../etc/passwd"}, 404, "context", "no context '../../etc/passwd'"),
    ({"messages": chat("hi"), "max_tokens": "four"}, 400, "max_tokens", "valid integer"),
])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server, body, status, param, message):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"
    assert server.client.completions.create(model="smollm2", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_malformed_json_and_the_openai_clients_errors(server):
    response = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "hi", ', timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        server.client.completions.create(model="smollm2", prompt="hi", extra_body={"kv_eviction": "nope"})
    assert bad.value.status_code == 400 and bad.value.body["param"] == "kv_eviction"
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="smollm2", prompt="hi", extra_body={"context": "ctx-ffffffffffffffff"})
    assert create_context(server.url, document="  ").json()["error"]["param"] == "document"
    assert httpx.delete(f"{server.url}/v1/contexts/ctx-ffffffffffffffff").status_code == 404


def test_concurrent_mixed_requests_each_get_the_answer_they_get_alone(server):
    """32 requests from 8 threads: with and without eviction, streamed and not, with a context id; every answer
    is the one the same request got alone (requests are served one at a time: one cache, one sequence)."""
    context_id = create_context(server.url, document=DOCUMENT, kv_keep=0.3).json()["id"]
    requests = []
    for i in range(32):
        eviction = [{}, {"kv_eviction": "snapkv", "kv_keep": 0.4}, {"kv_eviction": "h2o", "kv_budget": 96},
                    {"context": context_id}][i % 4]
        question = f"{haystack(6 + i % 5, seed=i)} Question {i}: name a color." if "context" not in eviction \
            else f"{QUESTION} ({i})"
        requests.append({"messages": chat(question), "max_tokens": 8 + i % 3, "temperature": 0,
                         "stream": i % 2 == 1, "extra_body": eviction})

    def send(request: dict) -> str:
        out = server.client.chat.completions.create(model="smollm2", **request)
        if request["stream"]:
            return "".join(chunk.choices[0].delta.content or "" for chunk in out if chunk.choices)
        return out.choices[0].message.content

    alone = [send(request) for request in requests]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(send, requests))
    assert together == alone and all(alone)


def readme_block(start: str) -> str:
    """The README's indented block whose first line starts with ``start``."""
    lines = README.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith(start))
    block = []
    for line in lines[first:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip()


def test_the_readme_server_lines_work_and_contexts_survive_a_restart(server, model_path, contexts_dir, tmp_path):
    created = create_context(server.url, document=DOCUMENT).json()
    server.stop()  # the module's server is done; the README's takes its place, on the same contexts

    [serve] = readme_commands("serve")
    readme_server = Server(serve[1:] + ["-m", model_path, "-t", "2", "--contexts-dir", str(contexts_dir)])
    try:
        assert created in httpx.get(f"{readme_server.url}/v1/contexts").json()["data"]
        answer = readme_server.client.chat.completions.create(model="x", messages=chat(QUESTION), max_tokens=16,
                                                              temperature=0, extra_body={"context": created["id"]})
        assert "4821" in answer.choices[0].message.content

        curl = readme_block("curl ").replace("\\\n", " ").replace("127.0.0.1:8000", f"127.0.0.1:{readme_server.port}")
        reply = json.loads(subprocess.run(shlex.split(curl), capture_output=True, text=True, check=True).stdout)
        assert reply["choices"][0]["message"]["content"] and reply["usage"]["kv"]["policy"] == "snapkv"

        code = readme_block("from openai import OpenAI").replace("127.0.0.1:8000", f"127.0.0.1:{readme_server.port}")
        printed = subprocess.run([sys.executable, "-c", code],
                                 capture_output=True, text=True, check=True).stdout
        assert printed.strip()

        deleted = httpx.delete(f"{readme_server.url}/v1/contexts/{created['id']}").json()
        assert deleted == {"id": created["id"], "object": "context.deleted", "deleted": True}
        assert not list(contexts_dir.glob(f"{created['id']}.*"))
        assert re.match(r"ctx-[0-9a-f]{16}$", created["id"])
    finally:
        readme_server.stop()


@pytest.mark.parametrize("arguments,message", [
    (["--kv-eviction", "nope"], "unknown kv_eviction policy 'nope'"),
    (["--kv-eviction", "snapkv", "--kv-keep", "0"], "kv_keep must be in (0, 1]"),
    (["--port", "70000"], "--port must be in [1, 65535], got 70000"),
])
def test_kvgguf_serve_refuses_bad_options_on_one_line(model_path, arguments, message, capsys):
    from kvgguf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "-m", model_path, *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("kvgguf serve: error: ") and error.count("\n") == 1 and message in error
