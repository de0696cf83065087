"""Real ``specserve serve`` subprocesses on 127.0.0.1 (default model, CPU) for the server tests.

The main server (session-scoped, speculative ngram decoding, an API key) serves most tests;
the overload and drain tests start their own. Servers run with one torch thread: on this
2-core machine the test client, the server's event loop and other work share the cores, and
torch's spinning worker threads then slow every step down several times over.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

API_KEY = "sk-test-key"
MODEL_NAME = "smol"
SPECULATIVE = "ngram"
SERVER_START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One ``python -m specserve serve`` child; its output goes to a log file (never a pipe)."""

    def __init__(self, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "SPECSERVE_DEBUG": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "specserve", "serve", "--device", "cpu", "--port", str(self.port), *args],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT_S) -> ServerProcess:
        """Poll /health until 200 (503 while loading is expected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                    if sock.recv(64).split(b"\r\n", 1)[0].endswith(b" 200 OK"):
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory: start a server with extra CLI args; every server is stopped at session end."""
    started: list[ServerProcess] = []

    def start(*args: str, wait: bool = True) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess(log, *args)
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    return start_server("--served-model-name", MODEL_NAME, "--api-key", API_KEY,
                        "--speculative-config", SPECULATIVE)


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


async def read_sse(response: aiohttp.ClientResponse) -> list[str]:
    """The data payloads of an SSE body, in order; asserts the framing is exactly ``data: ...\\n\\n``."""
    raw = (await response.read()).decode()
    assert raw.endswith("\n\n"), raw[-200:]
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw[:500]
    return [e[len("data: "):] for e in events]


def chunks_of(payloads: list[str]) -> list[dict]:
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


async def metric(session: aiohttp.ClientSession, base_url: str, name: str) -> float:
    async with session.get(f"{base_url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def wait_for_metric(session, base_url, name, value, timeout=20.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        current = await metric(session, base_url, name)
        if current == value or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.2)
