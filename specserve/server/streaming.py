"""Turning a ``RequestStream`` into an HTTP answer: Server-Sent Events, or one JSON body.

Stream deltas come from the engine's cumulative *emittable* text (which already holds back
half UTF-8 characters and possible starts of stop strings): choice i's delta is the part of
its text past what was sent, so the deltas concatenate to exactly the non-streamed text. A
chunk is written (and flushed) as soon as a step gives a choice new text or finishes it;
with ``stream_options.pace_tokens`` a step's tokens go out one at a time, spread over the
step's duration, instead of in one burst. With ``stream_options.include_spec_stats`` every
chunk carries ``accepted_tokens``: how many of its tokens were accepted drafts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Piece:
    """Text of one choice due at ``due`` (event-loop time); ``final`` on the choice's last piece."""

    due: float
    index: int
    text: str
    accepted_tokens: int  # of the piece's tokens, how many were accepted drafts
    final: RequestOutput | None


@dataclass
class _Choice:
    """What has been sent for one choice."""

    sent_text: str = ""
    previous: RequestOutput | None = None
    last_output_time: float | None = None
    unsent_accepted: int = 0  # accepted drafts of steps whose text is not out yet


def _split(output: RequestOutput, choice: _Choice, pace: bool) -> list[tuple[str, int]]:
    """The output's new text as (text, accepted drafts) pieces: one per token that adds text when
    pacing (a token without text joins the next), else one piece. Token j of a step is an accepted
    draft iff j < the step's accepted drafts (the bonus token comes last)."""
    previous_accepted = choice.previous.num_accepted_tokens if choice.previous else 0
    num_new = len(output.new_token_ids)
    accepted = max(0, min(output.num_accepted_tokens - previous_accepted, num_new))
    start, text = len(choice.sent_text), output.text
    if not pace or num_new == 0:
        return [(text[start:], accepted)]
    ends = list(output.new_token_text_ends) + [len(text)] * (num_new - len(output.new_token_text_ends))
    ends[-1] = len(text)
    pieces, carried = [], 0
    for j, end in enumerate(ends):
        carried += j < accepted
        if end > start:
            pieces.append((text[start:end], carried))
            start, carried = end, 0
    if carried and pieces:
        pieces[-1] = (pieces[-1][0], pieces[-1][1] + carried)
    return pieces or [("", carried)]


async def _write_events(response: web.StreamResponse, stream: RequestStream, builder: ResponseBuilder) -> None:
    """Write each step's text as it comes, or, with ``pace_tokens``, one token's text at a time
    spread over the time the step took (a choice's leftover pieces go out at once when its next
    step arrives, so pacing never lags a full step behind)."""
    request, loop = builder.request, asyncio.get_running_loop()
    choices = [_Choice() for _ in stream.request_ids]
    pending: list[_Piece] = []  # by due time
    num_completion_tokens = 0

    async def write(piece: _Piece) -> None:
        choice = choices[piece.index]
        if not piece.text and piece.final is None:
            choice.unsent_accepted += piece.accepted_tokens
            return
        accepted = piece.accepted_tokens + choice.unsent_accepted
        choice.unsent_accepted = 0
        choice.sent_text += piece.text
        chunk = builder.delta_chunk(piece.index, piece.text, piece.final,
                                    accepted if request.include_spec_stats else None)
        await response.write(sse_event(chunk))

    if builder.is_chat:
        for index in range(len(choices)):
            await response.write(sse_event(builder.role_chunk(index)))
    while stream.unfinished or pending:
        now = loop.time()
        while pending and pending[0].due <= now:
            await write(pending.pop(0))
        if not (stream.unfinished or pending):
            break
        timeout = pending[0].due - now if pending else None
        if not stream.unfinished:
            await asyncio.sleep(timeout)
            continue
        try:
            output = await asyncio.wait_for(stream.next_output(), timeout)
        except TimeoutError:
            continue
        now = loop.time()
        index = stream.index_of(output.request_id)
        choice = choices[index]
        for piece in [p for p in pending if p.index == index]:  # the next step is here: catch up
            pending.remove(piece)
            await write(piece)
        pieces = _split(output, choice, request.pace_tokens)
        step_s = now - choice.last_output_time if choice.last_output_time is not None else 0.0
        choice.previous, choice.last_output_time = output, now
        final = output if output.finished else None
        for j, (text, accepted) in enumerate(pieces):
            due = now + step_s * j / len(pieces)
            pending.append(_Piece(due, index, text, accepted, final if j == len(pieces) - 1 else None))
        pending.sort(key=lambda piece: piece.due)
        if output.finished:
            num_completion_tokens += output.num_generated_tokens
    if request.include_usage:
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
