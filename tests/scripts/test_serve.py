"""scripts/serve.py as a user runs it: a subprocess on 127.0.0.1 that answers, checks its API key,
and shuts down cleanly on SIGTERM; and under torchrun, tensor parallel over two processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from plugins.inference.lockstep import IDLE_ORDERS_S
from tests.conftest import REPO, import_or_skip
from tests.plugins.inference.tiny import (
    random_model,
    save_dcp_checkpoint,
    tiny_args,
    train_tokenizer,
)
from tests.scripts.test_generate import engine_text, load_script

httpx = import_or_skip("httpx")
import_or_skip("fastapi")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_answers_on_localhost_with_an_api_key(tmp_path: Path):
    """Under a RoPE scaling given on the command line, which sets the context it serves."""
    checkpoint = save_dcp_checkpoint(
        random_model(tiny_args()), tmp_path / "step-1", train_tokenizer(tmp_path / "tok.model")
    )
    port = free_port()
    command = [sys.executable, str(REPO / "scripts/serve.py"), "--checkpoint", str(checkpoint)]
    command += ["--port", str(port), "--api-key", "secret", "--max-batch", "2"]
    command += ["--rope-scaling", "yarn", "--rope-factor", "2"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(server, url)
        body = {"prompt": "def f(", "max_tokens": 5, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        headers = {"Authorization": "Bearer secret"}
        response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 5
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=30)[0]
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports it.
    assert server.returncode in (0, -signal.SIGTERM) and "Traceback" not in output, output
    assert f"on http://127.0.0.1:{port}" in output
    scaling = {"type": "yarn", "factor": 2.0, "original_max_seq_len": 64}
    assert f"context 128 tokens, RoPE {scaling}" in output  # trained 64 × factor 2


def test_unknown_rope_scaling_is_a_one_line_error(tmp_path: Path, capsys):
    checkpoint = save_dcp_checkpoint(
        random_model(tiny_args()), tmp_path / "step-1", train_tokenizer(tmp_path / "tok.model")
    )
    argv = ["--checkpoint", str(checkpoint), "--rope-scaling", "yarm", "--rope-factor", "2"]
    assert load_script("serve").main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("serve.py: error: --rope-scaling: unknown rope_scaling 'yarm'")
    assert "yarn" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
        (["--max-len", "65"], "--max-len 65 is past the model's context of 64 tokens"),
        (["--max-batch", "10000000"], "the KV cache for --max-batch 10000000 × --max-len 64"),
        (["--kv-cache-gib", "0.00001"], "--kv-cache-gib 1e-05 holds 16 positions, less than"),
        (["--kv-cache-gib", "100000"], "the KV cache for --kv-cache-gib 64 needs 100000.0 GiB"),
    ],
)
def test_sizes_that_cannot_run_are_one_line_errors(tmp_path: Path, flags, named, capsys):
    checkpoint = save_dcp_checkpoint(
        random_model(tiny_args()), tmp_path / "step-1", train_tokenizer(tmp_path / "tok.model")
    )
    assert load_script("serve").main(["--checkpoint", str(checkpoint), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"serve.py: error: {named}") and err.count("\n") == 1, err


@pytest.mark.slow
def test_serve_under_torchrun_answers_as_one_process_would(tmp_path: Path):
    """Two processes split the model; process 0 serves and keeps the other in step. Three
    concurrent requests on two cache slots (one waits, then joins the running batch) get the
    one-process greedy text."""
    checkpoint = save_dcp_checkpoint(
        random_model(tiny_args()), tmp_path / "step-1", train_tokenizer(tmp_path / "tok.model")
    )
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(REPO / "scripts/serve.py")]
    command += ["--checkpoint", str(checkpoint), "--port", str(port), "--max-batch", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    prompts = ["def f(", "import os", "class A:"]
    try:
        wait_until_healthy(server, url)

        def complete(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": 10, "temperature": 0}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(complete, prompts))
        # A client that leaves mid-stream cancels its request in both processes.
        body = {"prompt": "x = ", "max_tokens": 40, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            assert next(stream.iter_lines()).startswith("data: ")
        time.sleep(2 * IDLE_ORDERS_S)  # idle orders keep the other process waiting, not failed
        assert complete(prompts[0]) == texts[0]
    finally:
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    assert texts == [engine_text(checkpoint, p, max_new_tokens=10) for p in prompts]
    assert "tensor parallel over 2" in output, output


def wait_until_healthy(server: subprocess.Popen, url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, server.stdout.read()
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            assert time.monotonic() < deadline, f"server did not start in {timeout} s"
            time.sleep(0.2)


def test_bench_serve_quick_load_test_has_no_errors_and_writes_its_plot(tmp_path: Path):
    command = [sys.executable, str(REPO / "scripts/bench_serve.py"), "--quick", "--threads", "1"]
    result = subprocess.run(
        [*command, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    levels = json.loads((tmp_path / "bench_serve.json").read_text())["levels"]
    assert [(level["clients"], level["requests"], level["errors"]) for level in levels] == [
        (1, 2, 0),
        (4, 8, 0),
    ]
    assert all(level["ttft_p50_ms"] > 0 and level["itl_p99_ms"] > 0 for level in levels)
    assert (tmp_path / "bench_serve.png").read_bytes().startswith(b"\x89PNG")
