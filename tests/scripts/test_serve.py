"""scripts/serve.py as a user runs it: a subprocess on 127.0.0.1 that answers, checks its API key,
and shuts down cleanly on SIGTERM."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.plugins.inference.tiny import (
    random_model,
    save_dcp_checkpoint,
    tiny_args,
    train_tokenizer,
)
from tests.scripts.test_generate import load_script

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_answers_on_localhost_with_an_api_key(tmp_path: Path):
    checkpoint = save_dcp_checkpoint(
        random_model(tiny_args()), tmp_path / "step-1", train_tokenizer(tmp_path / "tok.model")
    )
    port = free_port()
    command = [sys.executable, str(REPO / "scripts/serve.py"), "--checkpoint", str(checkpoint)]
    command += ["--port", str(port), "--api-key", "secret", "--max-batch", "2"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not start in 60 s"
                time.sleep(0.2)
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


def test_serve_under_torchrun_says_where_tensor_parallel_runs(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_script("serve").main([]) == 2
    assert "torchrun scripts/generate.py" in capsys.readouterr().err
