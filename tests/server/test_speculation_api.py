"""The per-request ``speculation`` object, the new sampling controls and stream cadence over HTTP.

The main server runs ngram speculation with its defaults: trees of up to 16 drafts, depth 6.
"""

from __future__ import annotations

import time

import aiohttp
import pytest

from tests.engine.test_speculation_policy import REPEATING, random_alphabet_prompts
from tests.server.conftest import chunks_of, metric, read_sse
from tests.server.test_errors import assert_openai_error, post

CONTROLS = {"repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.3, "logit_bias": {"198": -2}}
SERVER_LIMITS = {"enabled": True, "max_tree_tokens": 16, "max_depth": 6, "drafters": ["ngram"]}
OFF = {"enabled": False, "max_tree_tokens": 0, "max_depth": 0, "drafters": []}


def complete(server, **fields) -> dict:
    body = {"prompt": REPEATING, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "return_spec_stats": True, **fields}
    status, _, answer = post(server, "/v1/completions", body)
    assert status == 200, answer
    return answer["choices"][0]


def test_a_request_lowers_the_budgets_and_raising_them_is_clamped(server):
    default = complete(server)
    assert default["spec_stats"]["speculation"] == SERVER_LIMITS
    assert len(default["spec_stats"]["accepted_per_depth"]) > 1

    lowered = complete(server, speculation={"max_tree_tokens": 2, "max_depth": 1})
    stats = lowered["spec_stats"]
    assert stats["speculation"] == {**SERVER_LIMITS, "max_tree_tokens": 2, "max_depth": 1}
    assert len(stats["accepted_per_depth"]) == 1 and 0 < stats["num_draft_tokens"] <= 2 * stats["num_steps"]
    assert lowered["text"] == default["text"]

    raised = complete(server, speculation={"max_tree_tokens": 10**6, "max_depth": 1000, "drafters": ["ngram", "draft"]})
    assert raised["spec_stats"]["speculation"] == SERVER_LIMITS

    for policy in ({"enabled": False}, {"drafters": ["early_exit"]}, {"max_tree_tokens": 0}):
        off = complete(server, speculation=policy)
        assert off["spec_stats"]["speculation"] == OFF and off["spec_stats"]["num_draft_tokens"] == 0
        assert off["text"] == default["text"]

    chat = {"messages": [{"role": "user", "content": REPEATING}], "max_tokens": 4, "return_spec_stats": True,
            "speculation": {"max_depth": 2}}
    status, _, answer = post(server, "/v1/chat/completions", chat)
    assert status == 200 and answer["choices"][0]["spec_stats"]["speculation"]["max_depth"] == 2


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"speculation": "on"}, "speculation"),
        ({"speculation": {"enabled": 1}}, "speculation.enabled"),
        ({"speculation": {"max_tree_tokens": -1}}, "speculation.max_tree_tokens"),
        ({"speculation": {"max_depth": 1.5}}, "speculation.max_depth"),
        ({"speculation": {"drafters": ["medusa"]}}, "speculation.drafters"),
        ({"speculation": {"budget": 4}}, "speculation.budget"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": "1"}, "frequency_penalty"),
        ({"repetition_penalty": -1}, "repetition_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": -101}}, "logit_bias"),
        ({"logit_bias": {"49152": 1}}, "logit_bias"),  # past the vocabulary: the engine's check
        ({"stream": True, "stream_options": {"pace_tokens": "yes"}}, "stream_options.pace_tokens"),
    ],
)
def test_bad_values_are_400s_naming_the_field(server, route, fields, param):
    base = {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in route else {"prompt": "Hi"}
    status, _, answer = post(server, route, {**base, "max_tokens": 2, **fields})
    assert assert_openai_error(status, answer, 400)["param"] == param


def test_seeded_requests_reproduce_with_speculation(server):
    greedy = {"seed": 5, **CONTROLS}
    on = complete(server, **greedy)
    off = complete(server, **greedy, speculation={"enabled": False})
    assert on["text"] == off["text"] and on["spec_stats"]["num_accepted_tokens"] > 0
    assert on["text"] != complete(server)["text"]  # the controls change the text
    sampled = {"temperature": 0.8, "top_k": 40, "min_p": 0.02, "seed": 9, **CONTROLS}
    first, second = complete(server, **sampled), complete(server, **sampled)
    assert first["text"] == second["text"] and first["spec_stats"]["num_draft_tokens"] > 0


async def test_paced_stream_with_accepted_tokens(server, auth):
    body = {"prompt": REPEATING, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_spec_stats": True}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.post(f"{server.base_url}/v1/completions", json=body) as response:
            whole = (await response.json())["choices"][0]
        stream_body = {**body, "stream": True, "stream_options": {"pace_tokens": True, "include_spec_stats": True}}
        async with session.post(f"{server.base_url}/v1/completions", json=stream_body) as response:
            chunks = chunks_of(await read_sse(response))
    choices = [c["choices"][0] for c in chunks]
    assert "".join(c["text"] for c in choices) == whole["text"]
    stats = choices[-1]["spec_stats"]
    assert all(isinstance(c["accepted_tokens"], int) for c in choices)
    assert 0 < sum(c["accepted_tokens"] for c in choices) <= stats["num_accepted_tokens"]
    assert len(choices) > stats["num_steps"] + 1  # steps came out token by token, not in bursts


async def test_switch_off_engages_on_random_tokens_and_costs_no_latency(server, auth):
    """Random tokens from a small alphabet defeat the ngram drafter. Per prompt, speculation on
    and off run in the order on, off, off, on (drift cancels) and each mode keeps its faster run
    (contention from other work on this shared CPU only ever slows a run down); speculation on
    may be at most 25% slower in total, and the switch-off counter must move. The requests are
    long enough (64 tokens) for their own losing steps to outweigh the good acceptance that
    earlier tests' requests left in the server's engine-wide record."""
    prompts = random_alphabet_prompts(2)
    seconds = {"on": 0.0, "off": 0.0}
    async with aiohttp.ClientSession(headers=auth) as session:
        switch_offs = await metric(session, server.base_url, "specserve_spec_decode_switch_offs_total")
        for prompt in prompts:
            runs: dict[str, list[float]] = {"on": [], "off": []}
            for mode in ("on", "off", "off", "on"):
                body = {"prompt": prompt, "max_tokens": 64, "temperature": 1.0, "ignore_eos": True,
                        "speculation": {"enabled": mode == "on"}}  # no seed: seeded requests never switch off
                start = time.perf_counter()
                async with session.post(f"{server.base_url}/v1/completions", json=body) as response:
                    assert response.status == 200
                    await response.read()
                runs[mode].append(time.perf_counter() - start)
            for mode in seconds:
                seconds[mode] += min(runs[mode])
        switch_offs = await metric(session, server.base_url, "specserve_spec_decode_switch_offs_total") - switch_offs
        switched_off_steps = await metric(session, server.base_url, "specserve_spec_decode_switched_off_steps_total")
    print(f"latency on {seconds['on']:.2f} s, off {seconds['off']:.2f} s, switch-offs {switch_offs:.0f}")  # -rP
    assert switch_offs >= 1 and switched_off_steps > 0
    assert seconds["on"] <= 1.25 * seconds["off"], seconds
