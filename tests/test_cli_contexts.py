"""``kvgguf compress`` and ``kvgguf ask`` on the default model: the file and the answer are the API's
(``Llama.compress``, ``load_context``, ``ask``), the progress shows both stages, and bad input (a missing
document, a bad keep, a corrupt file, a file of another model) ends in one line with exit status 2."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kvgguf import Llama
from kvgguf.cli import main
from kvgguf.text import haystack

FACT = "The secret code for the vault is 4821."
QUESTION = "What is the secret code for the vault? Answer with the number."
MODEL_ARGS = ["-c", "2048", "-t", "1"]


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    path.write_text(f"{haystack(30)} {FACT} {haystack(12, 1)}")
    return str(path)


def test_compress_then_ask_gives_the_apis_context_and_answer(model_path, document, tmp_path, capsys):
    kvc = tmp_path / "doc.kvc"
    assert main(["compress", document, "-o", str(kvc), "-m", model_path, "--kv-keep", "0.3", *MODEL_ARGS]) == 0
    captured = capsys.readouterr()
    assert "prefill" in captured.err and "reconstruction" in captured.err  # a progress bar per stage
    assert f"{kvc}: " in captured.out and "kvzip (keep 0.3)" in captured.out
    llm = Llama(model_path, n_ctx=2048, n_threads=1, verbose=False)
    try:
        loaded = llm.load_context(kvc)
        expected = llm.compress(open(document).read(), keep=0.3)
        assert loaded.policy == "kvzip" and loaded.keep == 0.3 and loaded.n_tokens == expected.n_tokens
        assert np.array_equal(loaded.positions, expected.positions)
        assert len(loaded.state) == len(expected.state) < 0.4 * loaded.n_tokens * llm.kv_stats()["bytes_per_cell"]
        answer = llm.ask(loaded, QUESTION, max_tokens=16, temperature=0)
    finally:
        llm.close()
    assert main(["ask", str(kvc), QUESTION, "-m", model_path, "-n", "16", "--temp", "0", *MODEL_ARGS]) == 0
    assert answer.strip() and capsys.readouterr().out == answer + "\n"


def test_compress_and_ask_refuse_bad_input_in_one_line(model_path, document, tmp_path, capsys):
    def refused(arguments: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            main([*arguments, "-m", model_path, *MODEL_ARGS])
        assert exit_info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert refused(["compress", str(tmp_path / "none.txt"), "-o", str(tmp_path / "x.kvc")]) == (
        f"kvgguf compress: error: {str(tmp_path / 'none.txt')!r}: no such file")
    assert "kv_keep must be in (0, 1]" in refused(["compress", document, "-o", str(tmp_path / "x.kvc"),
                                                   "--kv-keep", "1.5"])
    assert refused(["ask", str(tmp_path / "none.kvc"), QUESTION]) == (
        f"kvgguf ask: error: {str(tmp_path / 'none.kvc')!r}: no such file")
    (tmp_path / "junk.kvc").write_bytes(b"not a context file")
    assert refused(["ask", str(tmp_path / "junk.kvc"), QUESTION]).startswith("kvgguf ask: error: ")
    # a context made with another model file is refused by that model's name
    llm = Llama(model_path, n_ctx=2048, n_threads=1, verbose=False)
    try:
        context = llm.compress(open(document).read(), keep=0.3)
    finally:
        llm.close()
    other = dataclasses.replace(context.model, fingerprint="0" * 64, name="Other-Model")
    dataclasses.replace(context, model=other).save(tmp_path / "other.kvc")
    line = refused(["ask", str(tmp_path / "other.kvc"), QUESTION])
    assert "model file differs" in line and "Other-Model" in line


def test_the_readme_compress_and_ask_commands_work(model_path, document, tmp_path, monkeypatch, capsys):
    from readme_commands import readme_commands

    monkeypatch.chdir(tmp_path)
    (tmp_path / "report.txt").write_text(open(document).read())
    commands = readme_commands("compress") + readme_commands("ask")
    assert [arguments[0] for arguments in commands] == ["compress", "ask"]
    for arguments in commands:
        assert main([*arguments, "-m", model_path, *MODEL_ARGS]) == 0, arguments
    assert (tmp_path / "report.kvc").is_file() and capsys.readouterr().out.strip().splitlines()[-1]
