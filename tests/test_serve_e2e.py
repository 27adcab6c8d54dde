"""`softprompt serve` as a real process on a free loopback port: start, answer, and a graceful SIGTERM that
finishes the request in flight before the process exits 0."""

from __future__ import annotations

import contextlib
import json
import os
import select
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
from serve_support import ADMIN, load, make_prompt
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


# ---- hardening probes against a real server ---------------------------------------------------------------
# `softprompt serve` (cli.main) in a child process whose decoding steps are slowed to 50 ms, so that a generation
# of 400 tokens takes 20 s and a freed row is told apart from a finished one.
SLOW_SERVE = """
import sys, time
from softprompt.serve import generation
real = generation.DecodeBatch.step
def slow(self, pm):
    time.sleep(0.05)
    return real(self, pm)
generation.DecodeBatch.step = slow
from softprompt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_healthy(c: httpx.Client, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if c.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)


def read_answer(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing (b"" when it closed without a word), waiting at most `seconds`."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


@pytest.mark.timeout(180)
def test_serve_hardening_probes(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    model_dir = tiny_model_dir("llama", tmp_path_factory.mktemp("e2e-hard-models"))
    bb = load(model_dir)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    make_prompt(prompts / "sentiment.safetensors", bb, model_dir, template="Review: {text} Sentiment:")
    make_prompt(prompts / "echo.safetensors", bb, model_dir, task="generate", template="Say: {text}")
    (prompts / "loop.safetensors").symlink_to(prompts / "loop.safetensors")  # a symlink loop
    os.mkfifo(prompts / "fifo.safetensors")  # opening it would block start-up forever
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", SLOW_SERVE, "serve", "--prompts", str(prompts), "--port", str(port),
           "--device", "cpu", "--max-wait-ms", "2", "--threads", "1", "--timeout-s", "120", "--max-body-mb", "1",
           "--max-connections", "40", "--header-timeout-s", "1.5", "--body-timeout-s", "2"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection per request: it sends its headers at once
    try:
        with httpx.Client(base_url=base, timeout=30, limits=fresh) as c:
            wait_healthy(c, proc)
            refused = {x["name"]: x["reason"] for x in c.get("/v1/tasks").json()["refused"]}
            assert set(refused) == {"loop", "fifo"}, refused  # refused with a reason, the rest served
            assert "not a regular file" in refused["fifo"]
            assert {t["name"] for t in c.get("/v1/tasks").json()["tasks"]} == {"sentiment", "echo"}

            # (2) a chunked body of up to 64 MiB against a 1 MiB limit: 413 while reading, the rest never read
            rss0 = rss_mb(proc.pid)
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
            chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
            sent, answer = 0, b""
            try:
                while sent < 64 * 2**20:
                    s.sendall(chunk)
                    sent += 0x10000
                    if select.select([s], [], [], 0)[0]:
                        break
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = read_answer(s, 5)
            s.close()
            assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
            assert b'"code":413' in answer and sent < 32 * 2**20, sent
            assert rss_mb(proc.pid) - rss0 < 100
            assert c.get("/healthz").status_code == 200

            # (4) 120 connections that send half a request and stall, against a cap of 40: the server keeps
            # answering (a new connection evicts the one that waited longest), and every staller is closed
            stallers = []
            codes = []
            for i in range(120):
                st = socket.create_connection(("127.0.0.1", port))
                st.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Le")
                stallers.append(st)
                if i % 20 == 19:
                    codes.append(c.get("/healthz").status_code)
            codes.append(c.post("/v1/classify", json={"task": "sentiment", "inputs": ["fine"]}).status_code)
            assert codes == [200] * len(codes), codes
            answers = [read_answer(st, 10) for st in stallers]  # all closed, by eviction or the header timeout
            for st in stallers:
                st.close()
            assert all(a.startswith(b"HTTP/1.1 408") or a.startswith(b"HTTP/1.1 503") for a in answers), {
                a[:40] for a in answers
            }
            # a body that stalls after its headers: 408 after --body-timeout-s
            st = socket.create_connection(("127.0.0.1", port))
            st.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"task\"")  # fmt: skip
            assert read_answer(st, 10).startswith(b"HTTP/1.1 408")
            st.close()
            # headers past what h11 buffers (16 KiB of an incomplete event): 400, in the error shape
            st = socket.create_connection(("127.0.0.1", port))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it may close before the end
                st.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n")
            big = read_answer(st, 10)
            st.close()
            assert big.startswith(b"HTTP/1.1 400") and b'"code": 400' in big, big[:200]
            assert c.get("/healthz").status_code == 200

            # (9) a non-streaming generation whose client disconnects: its row is freed at once
            s = socket.create_connection(("127.0.0.1", port))
            body = json.dumps({"task": "echo", "input": "tell me everything", "max_new_tokens": 400}).encode()
            s.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            deadline = time.monotonic() + 30
            while c.get("/healthz").json()["active_generations"] == 0:
                assert time.monotonic() < deadline, "the generation did not start"
                time.sleep(0.05)
            s.close()  # 400 steps of 50 ms: 20 s if it ran on
            deadline = time.monotonic() + 8  # a hang detector: freed within a step or two
            while c.get("/healthz").json()["active_generations"] != 0:
                assert time.monotonic() < deadline, "the disconnected generation kept decoding"
                time.sleep(0.05)
            r = c.post("/v1/generate", json={"task": "echo", "input": "hi", "max_new_tokens": 3})
            assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert "refusing prompt" in out and "Too many open files" not in out
        assert out.count("connection limit") <= 4, out  # rate-limited: one line per kind of event per 10 s
        assert out.count("did not arrive within") <= 4, out
        assert len(out.splitlines()) < 60, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
