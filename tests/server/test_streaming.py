"""Stream cadence without a server: per-token pieces, pacing over the step's duration, accepted_tokens."""

from __future__ import annotations

import asyncio
import json
import time

from specserve.engine.outputs import RequestOutput
from specserve.server.async_engine import RequestStream
from specserve.server.protocol import parse_generation_request
from specserve.server.responses import ResponseBuilder
from specserve.server.streaming import _Choice, _split, _write_events


def output(text: str, new: list[int], ends: list[int], accepted_total: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r-0", text, new, new, 3, finished, "length" if finished else None,
                         num_steps=1, num_accepted_tokens=accepted_total, new_token_text_ends=ends)


def test_split_gives_one_piece_per_token_with_text():
    step = output("Hello world!", [5, 6, 7], [5, 11, 12], accepted_total=2)
    assert _split(step, _Choice(), pace=True) == [("Hello", 1), (" world", 1), ("!", 0)]
    assert _split(step, _Choice(), pace=False) == [("Hello world!", 2)]
    # a token with no text yet (half a character) joins the next; what was sent is skipped
    sent = _Choice(sent_text="Hi", previous=output("Hi", [1], [2], accepted_total=1))
    step = output("Hi there", [2, 3, 4, 5], [2, 2, 5, 8], accepted_total=4)
    assert _split(step, sent, pace=True) == [(" th", 3), ("ere", 0)]


class FakeResponse:
    def __init__(self) -> None:
        self.events: list[tuple[float, dict | str]] = []

    async def write(self, data: bytes) -> None:
        payload = data.decode()[len("data: "):-2]
        self.events.append((time.monotonic(), payload if payload == "[DONE]" else json.loads(payload)))

    async def write_eof(self) -> None:
        pass


async def run_stream(stream_options: dict, step_s: float) -> list[tuple[float, dict]]:
    request = parse_generation_request({"prompt": "x", "stream": True, "stream_options": stream_options},
                                       "completion")
    queue: asyncio.Queue = asyncio.Queue()
    stream = RequestStream(None, ["r-0"], queue, 3)
    response = FakeResponse()

    async def engine() -> None:
        queue.put_nowait(output("A", [1], [1], accepted_total=0))
        await asyncio.sleep(step_s)  # one step: 3 accepted drafts and the bonus token
        queue.put_nowait(output("ABCDE", [2, 3, 4, 5], [2, 3, 4, 5], accepted_total=3, finished=True))

    producer = asyncio.ensure_future(engine())
    await _write_events(response, stream, ResponseBuilder(request, "m"))
    await producer
    assert response.events[-1][1] == "[DONE]"
    return [(t, e) for t, e in response.events[:-1]]


async def test_paced_tokens_spread_over_the_step():
    events = await run_stream({"pace_tokens": True, "include_spec_stats": True}, step_s=0.4)
    choices = [e["choices"][0] for _, e in events]
    assert [c["text"] for c in choices] == ["A", "B", "C", "D", "E"]
    assert [c["accepted_tokens"] for c in choices] == [0, 1, 1, 1, 0]
    assert [c["finish_reason"] for c in choices] == [None] * 4 + ["length"]
    gaps = [b - a for (a, _), (b, _) in zip(events[1:], events[2:])]
    assert all(0.07 < gap < 0.2 for gap in gaps), gaps  # 0.4 s / 4 tokens each


async def test_unpaced_steps_arrive_in_one_chunk_without_stats_unless_asked():
    events = await run_stream({"include_spec_stats": True}, step_s=0.1)
    assert [(e["choices"][0]["text"], e["choices"][0]["accepted_tokens"]) for _, e in events] == [
        ("A", 0), ("BCDE", 3)]
    events = await run_stream({}, step_s=0.0)
    assert [e["choices"][0]["text"] for _, e in events] == ["A", "BCDE"]
    assert all("accepted_tokens" not in e["choices"][0] for _, e in events)
