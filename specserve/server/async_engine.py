"""One ``LLMEngine`` driven by one dedicated thread, used from asyncio.

    asyncio thread                               engine thread (owns the LLMEngine)
    --------------                               ----------------------------------
    add()   --_Call(admit)-->  commands deque --> load once, then loop:
    abort() --_Abort(ids)--->  + Condition          take every queued command (adds, aborts)
    stop()  --_Stop--------->                       one engine.step() over every running request
    _dispatch(outputs) <--- call_soon_threadsafe --  post this iteration's outputs
      -> the asyncio.Queue of each request's stream  sleep on the Condition when idle

Every call into the engine (tokenizing, check_request, add_request, step, abort) happens in the
engine thread, between steps, so requests join and leave the batch only between steps.

Invariants:
- a request id is *registered* (has a queue in ``_streams``) from ``add`` until its finished
  output is dispatched or the engine reports it unknown; exactly one reservation slot is held
  per registered id, so ``num_reserved`` counts admitted engine requests not yet finished;
- an aborted request's blocks are freed by ``engine.abort`` in the engine thread, and its final
  output (finish_reason "abort") reaches its stream like any other.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from specserve.config import EngineConfig
from specserve.engine.gc_heap import freeze_startup_heap
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.outputs import RequestOutput
from specserve.errors import RequestError
from specserve.server.metrics import ServerMetrics
from specserve.server.protocol import GenerationRequest, TokenizeRequest

ENGINE_THREAD = "specserve-engine"  # the thread that loads the model, then runs the engine


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"  # no new requests; running ones finish
    FAILED = "failed"  # the model did not load
    STOPPED = "stopped"


class EngineUnavailable(Exception):
    """The engine takes no requests now (loading, draining or stopped)."""


class QueueFull(Exception):
    """Admitting the request would queue more than ``max_queued_requests`` sequences."""


@dataclass(frozen=True)
class EngineInfo:
    """What the asyncio side may know about the loaded engine (read once, never changes)."""

    model_name: str
    max_model_len: int
    num_kv_blocks: int
    speculative_method: str


@dataclass(frozen=True)
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future


@dataclass(frozen=True)
class _Abort:
    request_ids: tuple[str, ...] | None  # None: every unfinished request


@dataclass(frozen=True)
class _Stop:
    pass


class RequestStream:
    """The n engine requests of one HTTP request; their outputs arrive on one queue."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], queue: asyncio.Queue,
                 num_prompt_tokens: int) -> None:
        self.engine = engine
        self.request_ids = request_ids
        self.queue = queue
        self.num_prompt_tokens = num_prompt_tokens
        self.unfinished = set(request_ids)

    def index_of(self, request_id: str) -> int:
        return self.request_ids.index(request_id)

    async def next_output(self) -> RequestOutput:
        output = await self.queue.get()
        if output.finished:
            self.unfinished.discard(output.request_id)
        return output

    def close(self) -> None:
        """Abort what has not finished (a client that went away); safe to call twice."""
        if self.unfinished:
            self.engine.abort(sorted(self.unfinished))
            self.unfinished.clear()


class AsyncEngine:
    def __init__(self, config: EngineConfig, metrics: ServerMetrics, max_queued_requests: int,
                 engine_factory: Callable[[EngineConfig], LLMEngine] = LLMEngine, freeze_heap: bool = False) -> None:
        """``freeze_heap``: once the engine is built, freeze the process's heap (``gc_heap``); for
        a server that owns its process."""
        self.config = config
        self.freeze_heap = freeze_heap
        self.metrics = metrics
        self.capacity = config.scheduler.max_num_seqs + max_queued_requests
        self.engine_factory = engine_factory
        self.state = EngineState.LOADING
        self.info: EngineInfo | None = None
        self.log = logging.getLogger("specserve.server.engine")
        # asyncio side (touched only in the event loop's thread)
        self.num_reserved = 0
        self._request_counter = itertools.count()
        self._streams: dict[str, asyncio.Queue] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.loaded: asyncio.Future | None = None
        # shared with the engine thread, under the condition's lock
        self._cond = threading.Condition()
        self._commands: deque[_Call | _Abort | _Stop] = deque()
        self._thread: threading.Thread | None = None

    # ---- lifecycle (asyncio side) --------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; it loads the model, then serves. ``loaded`` resolves then."""
        self._loop = asyncio.get_running_loop()
        self.loaded = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name=ENGINE_THREAD, daemon=True)
        self._thread.start()

    def begin_drain(self) -> None:
        if self.state in (EngineState.LOADING, EngineState.READY):
            self.state = EngineState.DRAINING

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until every admitted request finished; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def abort_all(self) -> None:
        self._enqueue(_Abort(None))

    async def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left, end the engine thread and wait for it (a loading thread is left)."""
        self.state = EngineState.STOPPED
        self._enqueue(_Stop())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)

    # ---- requests (asyncio side) ---------------------------------------------------------

    async def add(self, request: GenerationRequest, arrival_time: float) -> RequestStream:
        """Admit ``request.n`` engine requests; raises EngineUnavailable, QueueFull or RequestError.

        The decision to turn a request away is taken here, before the caller sends any header.
        """
        if self.state != EngineState.READY:
            raise EngineUnavailable(self.state.value)
        if request.n > self.capacity:
            raise RequestError(f"n is {request.n} but this server runs or queues at most {self.capacity} "
                               "sequences: ask for fewer choices", "n")
        if self.num_reserved + request.n > self.capacity:
            raise QueueFull()
        base = f"req-{next(self._request_counter)}"
        request_ids = [f"{base}-{i}" for i in range(request.n)]
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        for request_id in request_ids:
            self._streams[request_id] = queue
        self.num_reserved += request.n
        self._idle.clear()
        future = self._call(lambda engine: self._admit(engine, request, request_ids, arrival_time))
        try:
            num_prompt_tokens = await future
        except RequestError:
            self._forget(request_ids)  # nothing was added
            raise
        except BaseException:
            self.abort(request_ids)  # cancelled: the add may have happened; the engine tells
            raise
        return RequestStream(self, request_ids, queue, num_prompt_tokens)

    def abort(self, request_ids: list[str]) -> None:
        self._enqueue(_Abort(tuple(request_ids)))

    async def tokenize(self, request: TokenizeRequest) -> list[int]:
        if self.state not in (EngineState.READY, EngineState.DRAINING):
            raise EngineUnavailable(self.state.value)
        return await self._call(lambda engine: request.token_ids(engine.tokenizer))

    # ---- engine thread -------------------------------------------------------------------

    def _admit(self, engine: LLMEngine, request: GenerationRequest, request_ids: list[str],
               arrival_time: float) -> int:
        """Tokenize, fill in the default max_tokens, check, add all n; the prompt's token count."""
        prompt_ids = request.prompt_token_ids(engine.tokenizer)
        params = request.params
        if not request.max_tokens_given:  # the rest of the context (and of the KV pool)
            room = min(engine.max_model_len, engine.num_kv_tokens - engine.num_draft_slots) - len(prompt_ids)
            params = replace(params, max_tokens=max(1, room))
        engine.check_request(prompt_ids, params)
        added = []
        try:
            for index, request_id in enumerate(request_ids):
                engine.add_request(prompt_ids, replace(params, seed=request.seed_of(index)),
                                   request_id, arrival_time, speculation=request.speculation)
                added.append(request_id)
        except BaseException:
            for request_id in added:
                engine.abort(request_id)
            raise
        self.metrics.record_admitted(len(prompt_ids) * len(request_ids))
        return len(prompt_ids)

    def _run(self) -> None:
        try:
            engine = self.engine_factory(self.config)
        except BaseException as exc:  # noqa: BLE001 - reported to the asyncio side
            self._post(self._on_load_failed, exc)
            return
        info = EngineInfo(
            model_name=engine.loaded.name,
            max_model_len=engine.max_model_len,
            num_kv_blocks=engine.kv_manager.pool.num_blocks,
            speculative_method=self.config.speculative.method,
        )
        self._record_state(engine)
        self.metrics.record_memory(**engine.memory_report())
        if self.freeze_heap:
            freeze_startup_heap()
        self._post(self._on_loaded, info)
        last_step_end = None  # when the previous step ended (None after idling)
        while True:
            with self._cond:
                while not self._commands and not engine.has_unfinished():
                    last_step_end = None  # idle: waiting is not loop overhead
                    self._cond.wait()
                commands = list(self._commands)
                self._commands.clear()
            outputs: list[RequestOutput] = []
            stop = False
            for command in commands:
                if isinstance(command, _Stop):
                    stop = True
                elif isinstance(command, _Abort):
                    outputs += self._abort(engine, command.request_ids)
                else:
                    self._run_call(engine, command)
            if stop:
                outputs += self._abort(engine, None)
            elif engine.has_unfinished():
                previous = engine.last_step
                outputs += self._step(engine)
                stats = engine.last_step
                if stats is not None and stats is not previous:  # a step ran (not one that scheduled nothing)
                    self.metrics.record_step(stats)
                    now = time.perf_counter()
                    if last_step_end is not None:  # from the previous step's end to this one's start
                        self.metrics.engine_loop_seconds.inc(max(0.0, now - stats.total_s - last_step_end))
                    last_step_end = now
                else:  # failed or scheduled nothing: the next gap is not the loop's alone
                    last_step_end = None
            self.metrics.record_outputs(outputs, time.perf_counter())
            self._record_state(engine)
            if outputs:
                self._post(self._dispatch, outputs)
            if stop:
                return

    def _run_call(self, engine: LLMEngine, call: _Call) -> None:
        try:
            result = call.fn(engine)
        except BaseException as exc:  # noqa: BLE001 - the caller gets it
            self._post(_resolve, call.future, None, exc)
        else:
            self._post(_resolve, call.future, result, None)

    def _abort(self, engine: LLMEngine, request_ids: tuple[str, ...] | None) -> list[RequestOutput]:
        outputs, unknown = [], []
        for request_id in list(engine.sequences) if request_ids is None else request_ids:
            output = engine.abort(request_id)
            if output is None:
                unknown.append(request_id)
            else:
                outputs.append(output)
        if unknown:  # never added, or finished already: release their registrations
            self._post(self._forget, unknown)
        return outputs

    def _step(self, engine: LLMEngine) -> list[RequestOutput]:
        try:
            return engine.step()
        except Exception:
            self.log.exception("engine step failed; aborting every running request")
            self.metrics.engine_errors.inc()
            return self._abort(engine, None)

    def _record_state(self, engine: LLMEngine) -> None:
        pool = engine.kv_manager.pool
        self.metrics.record_engine_state(
            len(engine.scheduler.running), len(engine.scheduler.waiting), pool.num_blocks, pool.num_free_blocks
        )

    # ---- plumbing ------------------------------------------------------------------------

    def _enqueue(self, command: _Call | _Abort | _Stop) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _call(self, fn: Callable[[LLMEngine], Any]) -> asyncio.Future:
        future = self._loop.create_future()
        self._enqueue(_Call(fn, future))
        return future

    def _post(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` in the event loop's thread (from the engine thread)."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _on_loaded(self, info: EngineInfo) -> None:
        self.info = info
        if self.state == EngineState.LOADING:
            self.state = EngineState.READY
        self.loaded.set_result(info)

    def _on_load_failed(self, exc: BaseException) -> None:
        self.state = EngineState.FAILED
        self.loaded.set_exception(exc)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if output.finished:
                queue = self._streams.pop(output.request_id, None)
                if queue is not None:
                    self._release(1)
            else:
                queue = self._streams.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self._streams.pop(request_id, None) is not None:
                self._release(1)

    def _release(self, count: int) -> None:
        self.num_reserved -= count
        if self.num_reserved == 0:
            self._idle.set()


def _resolve(future: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if future.done():  # the awaiting handler was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
