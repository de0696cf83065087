"""Continuous batching under concurrent clients, and clients that go away mid-stream."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.server.conftest import chunks_of, metric, read_sse, wait_for_metric

TOPICS = ["the sea", "a robot", "autumn", "a small cat", "the moon", "bread", "a train", "music"]


def client_request(i: int) -> dict:
    """Client i's body: a mix of lengths, temperatures, seeds and stop strings."""
    body = {
        "messages": [{"role": "user", "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}],
        "max_tokens": (8, 12, 16, 24)[i % 4],
        "temperature": (0.0, 0.8, 1.0, 1.2)[(i // 4) % 4],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if i % 2:
        body["seed"] = 1000 + i
    if i % 3 == 0:
        body["stop"] = ["."]
    return body


async def stream_chat(session: aiohttp.ClientSession, base_url: str, body: dict) -> tuple[str, str, int]:
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
        assert response.status == 200, await response.text()
        chunks = chunks_of(await read_sse(response))
    *choice_chunks, usage_chunk = chunks
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in choice_chunks)
    return text, choice_chunks[-1]["choices"][0]["finish_reason"], usage_chunk["usage"]["completion_tokens"]


async def test_sixteen_concurrent_streams_finish_correctly(server, auth):
    bodies = [client_request(i) for i in range(16)]
    async with aiohttp.ClientSession(headers=auth) as session:
        results = await asyncio.gather(*(stream_chat(session, server.base_url, b) for b in bodies))
        seeded = [i for i, b in enumerate(bodies) if "seed" in b]
        again = await asyncio.gather(*(stream_chat(session, server.base_url, bodies[i]) for i in seeded))
        assert await wait_for_metric(session, server.base_url, "specserve_kv_cache_used_blocks", 0) == 0
    for body, (text, finish_reason, num_tokens) in zip(bodies, results):
        assert 1 <= num_tokens <= body["max_tokens"]
        if finish_reason == "length":
            assert num_tokens == body["max_tokens"]
        else:
            assert finish_reason == "stop"  # EOS or a stop string
        for stop in body.get("stop", []):
            assert stop not in text
    for i, result in zip(seeded, again):
        assert result == results[i], f"seeded request {i} did not reproduce"


async def test_fifty_disconnected_clients_free_the_kv_pool(server, auth):
    """50 streaming clients leave after their first text, 5 waiting clients time out."""
    async def start_and_leave(session: aiohttp.ClientSession, i: int) -> None:
        body = {"prompt": f"Story number {i % 5}: once upon a time", "max_tokens": 500, "ignore_eos": True,
                "temperature": 0.9, "stream": True}
        response = await session.post(f"{server.base_url}/v1/completions", json=body)
        assert response.status == 200
        while True:  # wait for a chunk with text: the request is running in the engine
            line = await response.content.readline()
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                break
        response.close()  # drops the connection mid-stream

    async def wait_and_leave(session: aiohttp.ClientSession, i: int) -> None:
        body = {"prompt": f"Essay number {i}:", "max_tokens": 500, "temperature": 0.9, "ignore_eos": True}
        with pytest.raises(TimeoutError):  # a non-streaming client that gives up
            await asyncio.wait_for(session.post(f"{server.base_url}/v1/completions", json=body), 3.0)

    async with aiohttp.ClientSession(headers=auth) as session:
        aborted_before = await aborted(session, server.base_url)
        await asyncio.gather(*(start_and_leave(session, i) for i in range(50)),
                             *(wait_and_leave(session, i) for i in range(5)))
        assert await wait_for_metric(session, server.base_url, "specserve_kv_cache_used_blocks", 0) == 0
        assert await metric(session, server.base_url, "specserve_num_requests_running") == 0
        assert await metric(session, server.base_url, "specserve_num_requests_waiting") == 0
        assert await aborted(session, server.base_url) - aborted_before == 55
        async with session.post(f"{server.base_url}/v1/completions",
                                json={"prompt": "Hello", "max_tokens": 4}) as response:
            assert response.status == 200  # still serving


async def aborted(session: aiohttp.ClientSession, base_url: str) -> float:
    try:
        return await metric(session, base_url, 'specserve_requests_finished_total{finish_reason="abort"}')
    except KeyError:
        return 0.0
