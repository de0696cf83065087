"""Overload (429 before any stream starts) and SIGTERM drains, each on its own server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import aiohttp

from tests.server.conftest import chunks_of


async def first_text_chunk(response: aiohttp.ClientResponse) -> list[bytes]:
    """Read SSE lines until a chunk carries text (the request is decoding); the lines read."""
    lines = []
    while True:
        line = await response.content.readline()
        lines.append(line)
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
            return lines


def sse_payloads(raw: bytes) -> list[str]:
    events = raw.decode().strip("\n").split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


async def test_burst_over_the_queue_gets_fast_429s(start_server):
    server = start_server("--max-num-seqs", "1", "--max-queued-requests", "2")

    async def send(session: aiohttp.ClientSession, i: int) -> tuple[int, float, dict, str]:
        body = {"prompt": f"Request {i}: the weather today is", "max_tokens": 8, "stream": i % 2 == 0}
        start = time.monotonic()
        async with session.post(f"{server.base_url}/v1/completions", json=body) as response:
            if response.status != 200:
                elapsed = time.monotonic() - start
                return response.status, elapsed, dict(response.headers), await response.text()
            await response.read()
            return response.status, time.monotonic() - start, dict(response.headers), ""

    async with aiohttp.ClientSession() as session:
        results = await asyncio.wait_for(asyncio.gather(*(send(session, i) for i in range(20))), 120)
    accepted = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] != 200]
    assert len(accepted) >= 3 and len(rejected) >= 10, [r[:2] for r in results]
    for status, elapsed, headers, text in rejected:
        assert status == 429 and elapsed < 2.0
        assert int(headers["Retry-After"]) >= 1
        assert headers["Content-Type"].startswith("application/json")  # decided before any SSE header
        assert json.loads(text)["error"]["code"] == "queue_full"
    assert server.stop() == 0


async def health_while_loading(server) -> tuple[int, dict, dict]:
    """The first /health answer the server gives (it listens before the model is loaded)."""
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 60
        while True:
            try:
                async with session.get(f"{server.base_url}/health") as response:
                    return response.status, dict(response.headers), await response.json()
            except aiohttp.ClientConnectionError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)


async def test_sigterm_lets_running_requests_finish(start_server):
    server = start_server("--shutdown-timeout", "60", wait=False)
    status, headers, body = await health_while_loading(server)
    assert (status, body["error"]["code"]) == (503, "loading") and "Retry-After" in headers
    server.wait_ready()
    body = {"prompt": "Tell me about the ocean.", "max_tokens": 40, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.base_url}/v1/completions", json=body) as response:
            head = await first_text_chunk(response)
            server.terminate()
            async with aiohttp.ClientSession() as probe:
                deadline = time.monotonic() + 10
                while True:  # the signal lands within milliseconds; /health then turns 503
                    async with probe.get(f"{server.base_url}/health") as health:
                        if health.status == 503:
                            assert (await health.json())["error"]["code"] == "draining"
                            break
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                async with probe.post(f"{server.base_url}/v1/completions", json={"prompt": "Hi"}) as late:
                    assert late.status == 503 and "shutting down" in (await late.json())["error"]["message"]
            rest = await response.read()
    chunks = chunks_of(sse_payloads(b"".join(head) + rest))
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 40
    assert server.proc.wait(timeout=30) == 0


async def test_sigterm_while_loading_exits_cleanly(start_server):
    """Stopped while the engine thread still loads the model: status 0, no abort (finalising the
    interpreter under a thread inside native code used to end in a C++ terminate, status 134)."""
    server = start_server(wait=False)
    status, _, body = await health_while_loading(server)
    assert (status, body["error"]["code"]) == (503, "loading")
    server.terminate()
    assert server.proc.wait(timeout=60) == 0
    assert "got SIGTERM: draining" in server.log() and "terminate called" not in server.log()


async def test_sigterm_aborts_what_outlives_the_shutdown_timeout(start_server):
    server = start_server("--shutdown-timeout", "0.5")
    body = {"prompt": "Tell me about the ocean.", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.base_url}/v1/completions", json=body) as response:
            head = await first_text_chunk(response)
            server.terminate()
            signalled = time.monotonic()
            rest = await asyncio.wait_for(response.read(), 30)
    chunks = chunks_of(sse_payloads(b"".join(head) + rest))
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert time.monotonic() - signalled < 15
    assert server.proc.wait(timeout=30) == 0


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specserve", "serve", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "SPECSERVE_DEBUG": ""})


def test_a_missing_model_or_a_busy_port_is_one_line_and_status_2():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = run_serve("--port", str(busy.getsockname()[1]))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("specserve: error: cannot listen on 127.0.0.1:")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = run_serve("--port", str(port), "--model", "/no/such/model.gguf")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("specserve: error: model path '/no/such/model.gguf'")
    assert "Traceback" not in result.stderr
