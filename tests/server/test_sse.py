"""Raw HTTP: SSE framing, [DONE], the usage chunk, spec stats, /tokenize, /health, /metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.server.conftest import MODEL_NAME, chunks_of, metric, read_sse

PROMPT = "Once upon a time, in a small village,"


async def test_sse_framing_and_deltas_concatenate_to_whole_text(server, auth):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(f"{server.base_url}/v1/completions", json=body) as response:
            assert response.status == 200
            whole = await response.json()
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}, "return_spec_stats": True}
        async with session.post(f"{server.base_url}/v1/completions", json=stream_body) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            chunks = chunks_of(await read_sse(response))
    *text_chunks, usage_chunk = chunks
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == MODEL_NAME for c in chunks)
    assert all(c["usage"] is None for c in text_chunks)
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == whole["choices"][0]["finish_reason"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    stats = text_chunks[-1]["choices"][0]["spec_stats"]
    assert set(stats) >= {"num_steps", "num_draft_tokens", "num_accepted_tokens", "mean_accepted_length"}
    assert stats["num_steps"] >= 1 and stats["mean_accepted_length"] >= 1.0
    assert "spec_stats" not in whole["choices"][0]


async def test_chat_stream_without_usage_and_with_stop(server, auth):
    """A stop string taken from the greedy answer cuts it exactly there, streamed or not."""
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(f"{server.base_url}/v1/chat/completions", json=body) as response:
            free_text = (await response.json())["choices"][0]["message"]["content"]
        stop = free_text.split()[2]  # a word inside the answer
        body["stop"] = [stop, "never appears \u00e9"]
        async with session.post(f"{server.base_url}/v1/chat/completions", json={**body, "stream": True}) as response:
            chunks = chunks_of(await read_sse(response))
        async with session.post(f"{server.base_url}/v1/chat/completions", json=body) as response:
            whole = await response.json()
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"] == free_text[: free_text.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "stop"


async def test_prompt_forms_and_tokenize(server, auth):
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(f"{server.base_url}/tokenize", json={"prompt": PROMPT}) as response:
            tokenized = await response.json()
        assert tokenized["count"] == len(tokenized["tokens"]) > 0 and tokenized["max_model_len"] == 8192
        texts = []
        for prompt in (PROMPT, [PROMPT], tokenized["tokens"]):
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
            async with session.post(f"{server.base_url}/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()
                answer = await response.json()
            assert answer["usage"]["prompt_tokens"] == tokenized["count"]
            texts.append(answer["choices"][0]["text"])
        assert texts[0] == texts[1] == texts[2]
        chat = {"messages": [{"role": "user", "content": "Hi"}]}
        async with session.post(f"{server.base_url}/tokenize", json=chat) as response:
            assert (await response.json())["count"] > 20  # the template's system turn


async def test_health_models_and_metrics_endpoints(server, auth):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.base_url}/health") as response:  # no key needed
            assert response.status == 200
        async with session.get(f"{server.base_url}/metrics") as response:
            assert response.status == 200
            text = await response.text()
        async with session.get(f"{server.base_url}/v1/models", headers=auth) as response:
            assert (await response.json())["data"][0]["max_model_len"] == 8192
        for name in ("specserve_num_requests_running", "specserve_num_requests_waiting",
                     "specserve_kv_cache_usage", "specserve_kv_cache_used_blocks",
                     "specserve_time_to_first_token_seconds_bucket", "specserve_inter_token_latency_seconds_bucket",
                     "specserve_prompt_tokens_total", "specserve_generation_tokens_total",
                     "specserve_spec_decode_draft_tokens_total", "specserve_spec_decode_accepted_tokens_total",
                     "specserve_spec_decode_mean_accepted_length", "specserve_weights_device_bytes",
                     "specserve_weights_host_bytes", "specserve_offload_resident_layers", "specserve_kv_cache_bytes"):
            assert f"\n{name}" in text, name
        assert await metric(session, server.base_url, "specserve_kv_cache_total_blocks") > 0
        assert await metric(session, server.base_url, "specserve_offload_resident_layers") == 30
        assert await metric(session, server.base_url, "specserve_weights_host_bytes") == 0


async def test_speculation_accepts_drafts_and_metrics_count_them(server, auth):
    """ngram drafting on a text that repeats itself: drafts are accepted, per depth too."""
    body = {"prompt": "one two three four five six seven eight. one two three four five six seven eight. one two",
            "max_tokens": 16, "temperature": 0, "ignore_eos": True, "return_spec_stats": True}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(f"{server.base_url}/v1/completions", json=body) as response:
            stats = (await response.json())["choices"][0]["spec_stats"]
        accepted_depth_1 = await metric(session, server.base_url,
                                        'specserve_spec_decode_accepted_tokens_per_depth_total{depth="1"}')
        mean_length = await metric(session, server.base_url, "specserve_spec_decode_mean_accepted_length")
    assert stats["num_accepted_tokens"] > 0 and stats["num_draft_tokens"] >= stats["num_accepted_tokens"]
    assert stats["num_steps"] < 16 and stats["mean_accepted_length"] > 1.0
    assert sum(stats["accepted_per_depth"]) == stats["num_accepted_tokens"]
    assert accepted_depth_1 >= stats["accepted_per_depth"][0] and mean_length > 1.0


async def test_metrics_time_engine_steps_by_kind_and_phase(server, auth):
    """A request's prompt step counts as a prefill step and its decode steps as drafting or plain
    ones; the phases add up to the steps; the loop counter grows between consecutive steps but
    not over an idle wait between two requests."""
    body = {"prompt": "one two three one two three one two", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    kinds = ("prefill", "drafting", "plain")
    loop_name, gate_name = "specserve_engine_loop_seconds_total", "specserve_spec_decode_gate_closed_steps_total"
    async with aiohttp.ClientSession(headers=auth) as session:

        async def read(name: str) -> float:
            return await metric(session, server.base_url, name)

        async def counts() -> list[float]:
            return [await read(f'specserve_engine_step_seconds_count{{kind="{kind}"}}') for kind in kinds]

        async def generate() -> None:
            async with session.post(f"{server.base_url}/v1/completions", json=body) as response:
                assert response.status == 200, await response.text()
            await asyncio.sleep(0.2)  # the engine thread records a step after its outputs go out

        before, loop_before, gate_before = await counts(), await read(loop_name), await read(gate_name)
        await generate()
        after, loop_after = await counts(), await read(loop_name)
        step_sum = sum([await read(f'specserve_engine_step_seconds_sum{{kind="{kind}"}}') for kind in kinds])
        phase_sum = sum([await read(f'specserve_engine_step_phase_seconds_total{{phase="{p}"}}')
                         for p in ("draft", "verify", "other")])
        await asyncio.sleep(0.5)  # idle: not loop time
        await generate()
        loop_last, gate_after = await read(loop_name), await read(gate_name)
    new_prefill, new_drafting, new_plain = (a - b for a, b in zip(after, before))
    assert new_prefill == 1 and new_drafting + new_plain >= 1 and new_prefill + new_drafting + new_plain <= 8
    assert phase_sum == pytest.approx(step_sum, rel=1e-6) and step_sum > 0
    assert gate_after == gate_before  # one request alone: the gate never decides below 8 sequences
    assert loop_after > loop_before  # at least two steps back to back
    assert loop_last - loop_after < 0.25  # the 0.5 s idle wait is left out
