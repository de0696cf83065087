"""The scheduler's admission: at once by default; with the admission hold, waiting requests
join together once enough wait or after a few held steps."""

import pytest

from specserve.cache.kv_cache_manager import KVCacheManager
from specserve.config import SamplingParams, SchedulerConfig
from specserve.engine.scheduler import Scheduler
from specserve.engine.sequence import Sequence
from specserve.errors import SpecserveError


def request(name: str, prompt_len: int = 5) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), prompt_len, SamplingParams(), None, None, 0.0)


def decode_step(scheduler: Scheduler) -> list[str]:
    """One schedule(); every scheduled sequence then computes its slots and samples a token
    (a prefilled prompt's next token, a decode's root). Returns the names that were prefills."""
    plan = scheduler.schedule()
    for item in plan.scheduled:
        item.seq.num_computed += item.num_slots
        if item.seq.num_computed == len(item.seq.token_ids):
            item.seq.token_ids.append(7)
    return [item.seq.request_id for item in plan.scheduled if item.is_prefill]


def running_batch(cfg: SchedulerConfig, names: list[str]) -> Scheduler:
    scheduler = Scheduler(cfg, KVCacheManager(256, 16, enable_prefix_caching=False))
    for name in names:
        scheduler.add(request(name))
    assert decode_step(scheduler) == names  # one step prefills them all
    return scheduler


def test_without_the_hold_each_arrival_prefills_in_the_next_step():
    scheduler = running_batch(SchedulerConfig(max_num_seqs=16), [f"r{i}" for i in range(8)])
    for step in range(3):
        scheduler.add(request(f"new{step}"))
        assert decode_step(scheduler) == [f"new{step}"]


def test_the_hold_waits_for_a_quarter_of_the_batch_then_admits_them_together():
    cfg = SchedulerConfig(max_num_seqs=16, prefill_hold_steps=8, prefill_hold_ratio=0.25)
    scheduler = running_batch(cfg, [f"r{i}" for i in range(8)])  # 8 running: ceil(0.25 * 8) = 2 must wait
    scheduler.add(request("a"))
    assert decode_step(scheduler) == [] and scheduler.num_held_steps == 1
    assert decode_step(scheduler) == [] and scheduler.num_held_steps == 2
    scheduler.add(request("b"))
    assert decode_step(scheduler) == ["a", "b"] and scheduler.num_held_steps == 0  # joined: the hold ends
    assert decode_step(scheduler) == [] and scheduler.num_held_steps == 0  # queue empty: nothing held


def test_the_hold_lets_a_lone_request_in_after_the_step_limit():
    cfg = SchedulerConfig(max_num_seqs=16, prefill_hold_steps=3)
    scheduler = running_batch(cfg, [f"r{i}" for i in range(8)])
    scheduler.add(request("a"))
    assert [decode_step(scheduler) for _ in range(4)] == [[], [], [], ["a"]]


def test_a_release_that_finds_no_free_blocks_does_not_start_a_new_hold():
    cfg = SchedulerConfig(max_num_seqs=16, prefill_hold_steps=2)
    scheduler = Scheduler(cfg, KVCacheManager(8, 16, enable_prefix_caching=False))
    for i in range(8):  # one block each: the pool is full
        scheduler.add(request(f"r{i}"))
    decode_step(scheduler)
    scheduler.add(request("a"))  # ceil(0.25 * 8) = 2 could join? 1 waits: held 2 steps, then no blocks
    assert [decode_step(scheduler) for _ in range(3)] == [[], [], []]
    assert scheduler.num_held_steps == 2 and not scheduler.holds_queue()
    scheduler.remove(scheduler.running[0])  # a block frees: "a" joins in the very next step
    assert decode_step(scheduler) == ["a"] and scheduler.num_held_steps == 0


def test_the_hold_never_delays_an_idle_engine_and_counts_only_requests_with_room():
    cfg = SchedulerConfig(max_num_seqs=10, prefill_hold_steps=2, prefill_hold_ratio=0.25)
    scheduler = Scheduler(cfg, KVCacheManager(256, 16, enable_prefix_caching=False))
    scheduler.add(request("first"))
    assert decode_step(scheduler) == ["first"]  # nothing running: no hold
    scheduler = running_batch(cfg, [f"r{i}" for i in range(9)])  # ceil(0.25 * 9) = 3, room for 1
    for name in "abc":
        scheduler.add(request(name))
    assert [decode_step(scheduler) for _ in range(3)] == [[], [], ["a"]]  # 3 wait, 1 could join: held 2 steps


def test_the_hold_does_not_wait_while_a_prompt_is_still_prefilling():
    cfg = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64, prefill_chunk_size=16,
                          prefill_hold_steps=8, prefill_hold_ratio=1.0)
    scheduler = Scheduler(cfg, KVCacheManager(256, 16, enable_prefix_caching=False))
    for name, length in (("r0", 5), ("r1", 5), ("long", 40)):
        scheduler.add(request(name, prompt_len=length))
    assert decode_step(scheduler) == ["r0", "r1", "long"]  # long's first 16-token chunk
    scheduler.add(request("a"))  # 1 waiting of the 3 the ratio asks, but a prompt rides along anyway
    assert decode_step(scheduler) == ["long", "a"]
    scheduler.add(request("b"))  # long's last chunk: still prefilling, still no hold
    assert decode_step(scheduler) == ["long", "b"]
    scheduler.add(request("c"))  # all five decode now: held
    assert decode_step(scheduler) == [] and scheduler.num_held_steps == 1 and scheduler.holds_queue()


def serve(engine, prompts: list[list[int]], lengths: list[int], in_flight: int) -> tuple[dict[str, list[int]], int]:
    """Requests in order, at most ``in_flight`` at once, admitted between steps as the server
    does; (output ids by request, steps that carried a prompt)."""
    ids, outputs, prompt_steps, next_request = [], {}, 0, 0
    while next_request < len(prompts) or engine.has_unfinished():
        while next_request < len(prompts) and len(engine.sequences) < in_flight:
            params = SamplingParams(max_tokens=lengths[next_request], temperature=0.0, ignore_eos=True)
            ids.append(engine.add_request(prompts[next_request], params))
            next_request += 1
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.token_ids
        prompt_steps += engine.last_step.kind == "prefill"
    return [outputs[i] for i in ids], prompt_steps


def test_held_admissions_change_when_prompts_run_not_what_they_generate(make_engine, chat_ids):
    """Greedy, fp32: the same tokens with the hold as without, in fewer prompt-carrying steps."""
    prompts, lengths = chat_ids[:8], [3, 9, 4, 12, 5, 8, 6, 10]
    plain, plain_steps = serve(make_engine(max_num_seqs=4), prompts, lengths, in_flight=8)
    held, held_steps = serve(make_engine(max_num_seqs=4, prefill_hold_steps=4, prefill_hold_ratio=0.5), prompts,
                             lengths, in_flight=8)
    assert held == plain and [len(x) for x in held] == lengths
    assert held_steps < plain_steps


@pytest.mark.parametrize("bad", [{"prefill_hold_steps": -1}, {"prefill_hold_ratio": 0.0}, {"prefill_hold_ratio": 1.5}])
def test_bad_hold_settings_are_refused(bad):
    with pytest.raises(SpecserveError, match="--prefill-hold"):
        SchedulerConfig(**bad)
