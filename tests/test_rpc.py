"""More than one machine: the model's last layers on a ggml-rpc-server (llama.cpp's RPC backend, started here on
loopback with `kvgguf rpc-server`), the first ones in this process. Eviction must work as on one host: the same
cells kept and the same answers, for a query-aware policy (SnapKV) and a compressed context (KVzip), with the
evicted cells gone from the layers the server holds too. Bad servers are refused by name.

The server offers its CPU, so both sides run the same kernels: the check is equality (kept positions, greedy
answers), with the split's logits within float rounding of the single host's. The split model runs in a child
process (tests/rpc_split.py): a server stays a device of the process that registered it, and a plain
llama_cpp.Llama loaded there later would query it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvgguf
from kvgguf import rpc
from kvgguf.cli import main

N_CTX = 2048
REMOTE_LAYERS = 15          # of SmolLM2's 30: the last 15 on the server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    try:
        rpc.server_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "kvgguf", "rpc-server", "--port", str(port), "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, f"kvgguf rpc-server exited: {process.stdout.read()}"
        assert time.monotonic() < deadline, "kvgguf rpc-server did not listen within 60 s"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield f"127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


def load(model_path: str, **kwargs) -> kvgguf.Llama:
    return kvgguf.Llama(model_path, n_ctx=N_CTX, n_batch=512, n_threads=1, verbose=False, kv_head_profile=None,
                        **kwargs)


def test_layers_on_an_rpc_server_evict_as_on_one_host(model_path, server, tmp_path):
    """tests/rpc_split.py, in a child process: the model on one host and split with the server, same steps."""
    child = subprocess.run([sys.executable, str(Path(__file__).with_name("rpc_split.py")), model_path, server,
                            str(REMOTE_LAYERS), str(tmp_path)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert child.returncode == 0, child.stderr[-3000:]
    log = child.stderr.split("--- remote model log", 1)[1].split("--- end of remote model log", 1)[0]
    assert f"offloaded {REMOTE_LAYERS}/31 layers" in log and "RPC0" in log and "KV buffer size" in log, log[-2000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])

    # no eviction: the split computes what one host computes
    assert out["logits_max_diff"] < 2e-3
    # SnapKV: one eviction to the same cells, in the layers of this process and of the server alike
    local, remote = out["snapkv_stats"]
    assert remote == local and local["evictions"] == 1 and local["cells_after"] < 0.5 * local["cells_before"]
    assert out["snapkv_positions_equal"]
    assert out["snapkv_answers"][1] == out["snapkv_answers"][0]   # (whether it is right: test_policies, seeds)
    # KVzip in tiers: the same tokens per tier; per head, the scores are the same up to float rounding (the
    # split model reconstructs in larger batches, as on a GPU), which may swap a near tie (measured: one token of
    # 481 in one of 90 heads)
    assert out["kvzip_tiered"] == [True, True] and out["kvzip_tier_held"][1] == out["kvzip_tier_held"][0]
    assert out["kvzip_positions_equal"] and out["kvzip_head_tokens_shared_min"] > 0.99
    assert out["kvzip_kept_ratio"] < 0.5
    assert out["kvzip_replies"][1] == out["kvzip_replies"][0] == out["kvzip_reply_from_file"]


def test_bad_rpc_servers_are_refused_by_name(model_path):
    closed = free_port()   # nothing listens there
    with pytest.raises(ValueError, match=f"cannot reach an RPC server at '127.0.0.1:{closed}'"):
        load(model_path, rpc_servers=f"127.0.0.1:{closed}", n_gpu_layers=4)
    for bad in ("localhost", "host:99999", ":50052", "a:b"):
        with pytest.raises(ValueError, match="is not 'host:port'"):
            load(model_path, rpc_servers=bad)
    with pytest.raises(ValueError, match="no server given"):
        load(model_path, rpc_servers=[])
    llm = load(model_path, kv_eviction="snapkv", kv_keep=0.5)   # the process still loads and evicts
    try:
        assert llm.create_completion("The capital of France is", max_tokens=4)["choices"][0]["text"]
    finally:
        llm.close()


def test_kvgguf_run_names_an_unreachable_server_on_one_line(capfd):
    closed = free_port()
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--rpc", f"127.0.0.1:{closed}", "-ngl", "4", "-c", "256", "-n", "2", "-p", "x"])
    err = capfd.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.splitlines() == [
        f"kvgguf run: error: rpc_servers: cannot reach an RPC server at '127.0.0.1:{closed}' (is `kvgguf "
        "rpc-server` running there, of the same kvgguf version?)"], err


def test_kvgguf_rpc_server_refuses_bad_options_on_one_line(capsys):
    for arguments, message in ((["--port", "0"], "--port must be in 1-65535, got 0"),
                               (["--threads", "0"], "--threads must be >= 1, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["rpc-server", *arguments])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
