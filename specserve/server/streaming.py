"""Turning a ``RequestStream`` into an HTTP answer: Server-Sent Events, or one JSON body.

Stream deltas come from the engine's cumulative *emittable* text (which already holds back
half UTF-8 characters and possible starts of stop strings): choice i's delta is the part of
its text past what was sent, so the deltas concatenate to exactly the non-streamed text. A
chunk is written (and flushed) as soon as a step gives a choice new text or finishes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from aiohttp import web

from specserve.engine.outputs import RequestOutput
from specserve.server.async_engine import RequestStream
from specserve.server.responses import ResponseBuilder

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def sse_event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def stream_sse(http_request: web.Request, stream: RequestStream, builder: ResponseBuilder) -> web.StreamResponse:
    """Write every choice's deltas as they come, then the usage chunk (if asked) and [DONE].

    A failed write (the client went away) ends the stream early; the caller then aborts the
    unfinished requests (``RequestStream.close``).
    """
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        await response.prepare(http_request)
        await _write_events(response, stream, builder)
    except ConnectionError:  # the client went away: the caller aborts what did not finish
        pass
    except Exception:  # a bug after the headers went out: no status to change, so an error event
        logging.getLogger("specserve.server").exception("stream failed")
        error = {"message": "the server hit an internal error; please report it", "type": "server_error",
                 "param": None, "code": "internal_error"}
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(sse_event({"error": error}))
            await response.write(sse_event("[DONE]"))
    return response


async def _write_events(response: web.StreamResponse, stream: RequestStream, builder: ResponseBuilder) -> None:
    num_choices = len(stream.request_ids)
    sent = [""] * num_choices
    num_completion_tokens = 0
    if builder.is_chat:
        for index in range(num_choices):
            await response.write(sse_event(builder.role_chunk(index)))
    while stream.unfinished:
        output = await stream.next_output()
        index = stream.index_of(output.request_id)
        delta = output.text[len(sent[index]):]
        if not delta and not output.finished:
            continue
        sent[index] = output.text
        await response.write(sse_event(builder.delta_chunk(index, delta, output if output.finished else None)))
        if output.finished:
            num_completion_tokens += output.num_generated_tokens
    if builder.request.include_usage:
        await response.write(sse_event(builder.usage_chunk(stream.num_prompt_tokens, num_completion_tokens)))
    await response.write(sse_event("[DONE]"))
    await response.write_eof()


async def collect(stream: RequestStream) -> list[RequestOutput]:
    """Wait for every choice to finish; their final outputs in choice order."""
    finals: dict[int, RequestOutput] = {}
    while stream.unfinished:
        output = await stream.next_output()
        if output.finished:
            finals[stream.index_of(output.request_id)] = output
    return [finals[i] for i in range(len(stream.request_ids))]
