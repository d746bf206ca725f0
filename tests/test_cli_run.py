"""``kvgguf run`` on the default model: the streamed text is the API's, eviction bounds the cache past n_ctx, and
bad input ends in one line on stderr with a non-zero exit."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvgguf import Llama
from kvgguf.cli import main
from readme_commands import readme_commands

PROMPT = "The three most useful things to pack for a week of hiking are"


def test_run_streams_the_same_completion_as_the_api(model_path, capsys):
    assert main(["run", "-m", model_path, "-p", PROMPT, "-n", "24", "--temp", "0", "-t", "1"]) == 0
    streamed = capsys.readouterr().out
    llm = Llama(model_path, n_ctx=4096, n_threads=1, verbose=False)
    try:
        tokens = llm.tokenize(PROMPT.encode(), add_bos=True, special=False)
        expected = llm.create_completion(tokens, max_tokens=24, temperature=0)["choices"][0]["text"]
    finally:
        llm.close()
    assert expected.strip() and streamed == expected + "\n"


def test_run_generates_past_n_ctx_with_decode_time_eviction(model_path, capsys):
    """600 tokens in a 256-cell context: decode-time StreamingLLM keeps the cache at its budget, and --verbose
    reports it (one JSON line on stderr)."""
    assert main(["run", "-m", model_path, "-p", PROMPT, "-n", "600", "--ignore-eos", "--temp", "0", "-t", "1",
                 "-c", "256", "--kv-eviction", "streaming", "--kv-budget", "128", "--kv-evict-every", "8",
                 "--verbose"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.err.strip().splitlines()[-1])
    assert report["generated_tokens"] == 600 and report["prompt_tokens"] + 600 > 2 * 256
    assert report["kv"]["policy"] == "streaming" and report["kv"]["evictions"] > 0
    assert report["kv"]["cells_now"] <= 128 + 8
    assert len(captured.out) > 600  # the text of 600 tokens


@pytest.mark.parametrize("arguments,message", [
    (["--kv-eviction", "snapkv", "--kv-keep", "2"], "kv_keep must be in"),
    (["--kv-eviction", "snapkvv"], "snapkvv"),
    (["-f", "/nonexistent/prompt.txt"], "-f '/nonexistent/prompt.txt': no such file"),
    (["--top-p", "1.5"], "--top-p must be in [0, 1], got 1.5"),
    (["-n", "-2"], "-n must be >= -1"),
])
def test_run_refuses_bad_input_by_name(model_path, capsys, arguments, message):
    prompt = [] if "-f" in arguments else ["-p", PROMPT]
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "-m", model_path, *prompt, "-n", "4", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_run_errors_are_one_line_without_a_traceback(tmp_path):
    not_a_model = tmp_path / "model.gguf"
    not_a_model.write_bytes(b"not a gguf file")
    run = subprocess.run([sys.executable, "-m", "kvgguf", "run", "-m", str(not_a_model), "-p", "hi"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [
        f"kvgguf run: error: model_path {str(not_a_model)!r} is not a GGUF file (starts with b'not ', not b'GGUF')"]


def test_the_readme_run_commands_work(model_path, capsys):
    commands = readme_commands("run")
    assert len(commands) >= 3
    for arguments in commands:
        assert main([*arguments, "-m", model_path, "-t", "1"]) == 0, arguments
        captured = capsys.readouterr()
        assert captured.out.strip(), arguments
        if "--kv-budget" in arguments:  # 1024 tokens through a 256-cell context, evicted back to 128 cells
            report = json.loads(captured.err.strip().splitlines()[-1])
            assert report["generated_tokens"] == 1024 and report["kv"]["evictions"] > 0
            assert report["kv"]["cells_now"] < 256
