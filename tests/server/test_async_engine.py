"""AsyncEngine's bookkeeping over a fake engine (no model): admission, abort, failures, stop."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from specserve.config import EngineConfig, SamplingParams, SchedulerConfig
from specserve.engine.outputs import RequestOutput
from specserve.errors import RequestError
from specserve.server.async_engine import AsyncEngine, EngineUnavailable, QueueFull
from specserve.server.metrics import ServerMetrics
from specserve.server.protocol import parse_generation_request

STEP_S = 0.005


class FakeEngine:
    """Generates token 7 once per step for every request; ``fail_steps`` makes steps raise."""

    def __init__(self, config: EngineConfig) -> None:
        self.loaded = SimpleNamespace(name="fake")
        self.max_model_len = 64
        self.num_kv_tokens = 1024
        self.num_draft_slots = 0
        self.tokenizer = None
        self.sequences: dict[str, tuple[SamplingParams, list[int], int, float]] = {}
        self.kv_manager = SimpleNamespace(pool=SimpleNamespace(num_blocks=8, num_free_blocks=8))
        self.scheduler = SimpleNamespace(running=[], waiting=[])
        self.fail_steps = 0
        self.last_step = None  # LLMEngine's StepStats of its last step; the fake keeps none
        self.thread_ids: set[int] = set()

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.thread_ids.add(threading.get_ident())
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"{len(prompt_ids)} + {params.max_tokens} exceed 64", "max_tokens")

    def add_request(self, prompt_ids, params, request_id, arrival_time, speculation=None):
        self.sequences[request_id] = (params, [], len(prompt_ids), arrival_time)

    def has_unfinished(self) -> bool:
        return bool(self.sequences)

    def memory_report(self) -> dict[str, int]:
        return {"device_bytes": 1, "host_bytes": 0, "resident_layers": 1, "kv_cache_bytes": 8}

    def _output(self, request_id: str, new: list[int], finish_reason: str | None) -> RequestOutput:
        params, generated, num_prompt, arrival = self.sequences[request_id]
        if finish_reason is not None:
            del self.sequences[request_id]
        return RequestOutput(request_id, "x" * len(generated), list(generated), new, num_prompt,
                             finish_reason is not None, finish_reason, arrival_time=arrival)

    def abort(self, request_id: str) -> RequestOutput | None:
        return self._output(request_id, [], "abort") if request_id in self.sequences else None

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        time.sleep(STEP_S)
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("boom")
        outputs = []
        for request_id, (params, generated, _, _) in list(self.sequences.items()):
            generated.append(7)
            done = len(generated) == params.max_tokens
            outputs.append(self._output(request_id, [7], "length" if done else None))
        return outputs


def request(max_tokens: int, n: int = 1):
    return parse_generation_request({"prompt": [1, 2, 3], "max_tokens": max_tokens, "n": n}, "completion")


@pytest.fixture
def fakes() -> list[FakeEngine]:
    return []


@pytest.fixture
async def engine(fakes):
    def factory(config: EngineConfig) -> FakeEngine:
        fakes.append(FakeEngine(config))
        return fakes[-1]

    config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=2))
    async_engine = AsyncEngine(config, ServerMetrics(), max_queued_requests=1, engine_factory=factory)
    async_engine.start()
    await async_engine.loaded
    yield async_engine
    await async_engine.stop(timeout=5)


async def drain(stream) -> list[RequestOutput]:
    outputs = []
    while stream.unfinished:
        outputs.append(await stream.next_output())
    return outputs


async def test_requests_run_to_the_end_and_release_their_slots(engine):
    first, second = await engine.add(request(3), 0.0), await engine.add(request(5, n=2), 0.0)
    assert engine.num_reserved == 3
    outputs = await drain(first)
    assert [o.token_ids for o in outputs] == [[7], [7, 7], [7, 7, 7]] and outputs[-1].finish_reason == "length"
    finals = [o for o in await drain(second) if o.finished]
    assert sorted(o.request_id for o in finals) == sorted(second.request_ids)
    assert await engine.wait_idle(1.0) and engine.num_reserved == 0


async def test_queue_full_and_impossible_n(engine):
    running = await engine.add(request(40, n=3), 0.0)  # capacity is 2 running + 1 queued
    with pytest.raises(QueueFull):
        await engine.add(request(1), 0.0)
    with pytest.raises(RequestError, match="n is 4"):
        await engine.add(request(1, n=4), 0.0)
    running.close()
    assert await engine.wait_idle(1.0)
    await drain(await engine.add(request(1), 0.0))


async def test_rejected_request_holds_nothing(engine):
    with pytest.raises(RequestError, match="exceed 64"):
        await engine.add(request(62), 0.0)
    assert engine.num_reserved == 0


async def test_close_aborts_and_frees(engine):
    stream = await engine.add(request(40, n=2), 0.0)
    await stream.next_output()
    stream.close()  # what the handler does when its client goes away
    assert await engine.wait_idle(1.0)
    finals = [stream.queue.get_nowait() for _ in range(stream.queue.qsize())]
    assert {o.finish_reason for o in finals if o.finished} == {"abort"}


async def test_cancelled_admission_is_cleaned_up(engine):
    task = asyncio.ensure_future(engine.add(request(40), 0.0))
    await asyncio.sleep(0)  # the add is queued for the engine thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await engine.wait_idle(1.0) and engine.num_reserved == 0


async def test_a_failing_step_aborts_running_requests_and_the_engine_goes_on(engine, fakes, caplog):
    stream = await engine.add(request(40), 0.0)
    await stream.next_output()
    [fake] = fakes
    fake.fail_steps = 1
    outputs = await drain(stream)
    assert outputs[-1].finish_reason == "abort"
    assert "engine step failed" in caplog.text
    assert engine.metrics.registry.get_sample_value("specserve_engine_errors_total") == 1
    assert (await drain(await engine.add(request(2), 0.0)))[-1].finish_reason == "length"
    assert len(fake.thread_ids) == 1  # every engine call ran in the one engine thread


async def test_stop_aborts_what_runs_and_refuses_new_requests(engine):
    stream = await engine.add(request(60 - 3), 0.0)
    await engine.stop(timeout=5)
    assert (await drain(stream))[-1].finish_reason == "abort"
    with pytest.raises(EngineUnavailable):
        await engine.add(request(1), 0.0)
