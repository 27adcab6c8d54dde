"""`softprompt serve` as a real process on a free loopback port: start, answer, and a graceful SIGTERM that
finishes the request in flight before the process exits 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_serve_support import ADMIN, load, make_prompt
from tiny import tiny_model_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(120)
def test_serve_subprocess_end_to_end(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    model_dir = tiny_model_dir("llama", tmp_path_factory.mktemp("e2e-models"))
    bb = load(model_dir)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    make_prompt(prompts / "sentiment.safetensors", bb, model_dir, template="Review: {text} Sentiment:")
    make_prompt(prompts / "echo.safetensors", bb, model_dir, task="generate", template="Say: {text}")
    port = free_port()
    env = {**os.environ, "SOFTPROMPT_ADMIN_TOKEN": ADMIN, "PYTHONUNBUFFERED": "1"}
    # no --model: the base model recorded in the prompts is served
    cmd = [sys.executable, "-m", "softprompt", "serve", "--prompts", str(prompts), "--port", str(port),
           "--device", "cpu", "--max-wait-ms", "2", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as c:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
            r = c.post("/v1/classify", json={"task": "sentiment", "inputs": ["a fine film", {"text": "bad"}]})
            assert r.status_code == 200 and len(r.json()["results"]) == 2
            assert {m["id"] for m in c.get("/v1/models").json()["data"]} == {"sentiment", "echo"}
            r = c.post("/v1/generate", json={"task": "echo", "input": "hi", "max_new_tokens": 4, "stream": True})
            assert r.headers["content-type"].startswith("text/event-stream") and r.text.endswith("data: [DONE]\n\n")
            assert c.delete("/v1/admin/tasks/echo").status_code == 401
            assert c.get("/metrics").text.count("softprompt_requests_total{") >= 3

            # SIGTERM while a long generation runs: it completes, then the process exits cleanly
            result: dict[str, Any] = {}

            def long_request() -> None:
                with httpx.Client(base_url=base, timeout=60) as c2:
                    body = {"task": "echo", "input": "tell me everything", "max_new_tokens": 150}
                    result["r"] = c2.post("/v1/generate", json=body)

            t = threading.Thread(target=long_request)
            t.start()
            while c.get("/healthz").json()["active_generations"] == 0:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            t.join(60)
            assert result["r"].status_code == 200, result["r"].text
            assert result["r"].json()["usage"]["output_tokens"] == 150 or result["r"].json()["finish_reason"] == "stop"
        assert proc.wait(60) == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert "loaded 2 task(s)" in out and "127.0.0.1" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
