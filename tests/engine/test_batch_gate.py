"""The batch gate: exact decisions on synthetic step timings, and in the engine."""

import pytest

from specserve.config import SamplingParams, SpeculativeConfig
from specserve.engine.batch_gate import (
    MARGIN,
    MAX_BACKOFF,
    MIN_BATCH,
    MIN_SAMPLES,
    REFRESH,
    BatchGate,
    batch_bucket,
)


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 16, 17, 32)] == [1, 2, 4, 4, 8, 16, 32, 32]


def run(gate: BatchGate, num_seqs: int, steps: int, drafting_s: float, plain_s: float) -> list[bool]:
    """Decide ``steps`` steps; a drafting step costs drafting_s per token, a plain one plain_s."""
    decisions = []
    for _ in range(steps):
        allowed = gate.allows_drafting(num_seqs)
        decisions.append(allowed)
        gate.record(num_seqs, (drafting_s if allowed else plain_s) * num_seqs, num_seqs, allowed)
    return decisions


def test_the_gate_alternates_until_both_rates_are_known_then_drafting_keeps_winning():
    gate = BatchGate(interval=4)
    decisions = run(gate, 8, 32, drafting_s=1.0, plain_s=2.0)
    # steps 2, 4, 6, 8 are plain (learning: MIN_SAMPLES of each kind); then a refresh every 16 steps
    assert [i + 1 for i, d in enumerate(decisions) if not d] == [2, 4, 6, 8, 16, 32]
    assert MIN_SAMPLES == 4 and REFRESH * 4 == 16
    assert gate.drafting_pays(8) is True
    assert gate.num_closed_steps == 6


def test_a_losing_bucket_closes_and_probes_drafting_ever_further_apart():
    gate = BatchGate(interval=4)
    decisions = run(gate, 16, 40, drafting_s=2.0, plain_s=1.0)
    # the first 8 steps alternate; both rates are known from step 9 on and drafting loses:
    # plain, with drafting probes 4, 8, 16 steps after the last drafting step ...
    assert [i + 1 for i, d in enumerate(decisions) if d] == [1, 3, 5, 7, 11, 19, 35]
    # ... and then MAX_BACKOFF * interval = 32 apart
    assert MAX_BACKOFF == 8
    assert [i + 41 for i, d in enumerate(run(gate, 16, 160, drafting_s=2.0, plain_s=1.0)) if d] == [67, 99, 131, 163, 195]
    assert gate.drafting_pays(16) is False
    assert gate.drafting_pays(9) is False  # the same bucket
    assert gate.drafting_pays(8) is None  # nothing measured at batch 8


def test_buckets_are_independent_and_the_gate_reopens_when_drafting_wins_again():
    gate = BatchGate(interval=4)
    run(gate, 16, 40, drafting_s=2.0, plain_s=1.0)
    assert run(gate, 8, 3, drafting_s=1.0, plain_s=2.0) == [True, False, True]  # batch 8 starts fresh: learning
    # the workload changes at batch 16: every drafting probe now costs a tenth of a plain step.
    # The first probe (32 steps after the last, at 67) pays, so the next ones come every 4
    # steps; after 4 of them the drafting rate is below the plain one
    later = run(gate, 16, 80, drafting_s=0.1, plain_s=1.0)
    assert [i + 41 for i, d in enumerate(later) if d][:6] == [67, 71, 75, 79, 81, 82]
    assert gate.drafting_pays(16) is True
    assert sum(later[-16:]) == 15  # open again: one refresh probe in 16 steps


def test_small_batches_are_never_gated_nor_recorded():
    gate = BatchGate(interval=2)
    assert MIN_BATCH == 8
    assert all(run(gate, 7, 40, drafting_s=2.0, plain_s=1.0))  # drafting would lose: still open
    assert gate.rates == {} and gate.num_closed_steps == 0


def test_steps_without_tokens_are_not_recorded_and_intervals_are_checked():
    gate = BatchGate(interval=2)
    gate.record(8, 1.0, 0, True)
    assert gate.rates == {}
    with pytest.raises(ValueError, match="interval"):
        BatchGate(interval=1)


def test_engine_gate_closed_keeps_greedy_output_and_steps_plain(make_engine, chat_ids):
    """A gate that has measured drafting losing at batch 8 keeps the steps plain, but for its
    drafting probes; greedy output is unchanged. Without the switch-off there is no gate."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = chat_ids[:8]
    expected = [o.token_ids for o in make_engine().generate(prompts, params)]
    engine = make_engine(speculative=SpeculativeConfig(method="ngram", max_tree_tokens=8, probe_interval=2))
    assert engine.gate is not None and engine.gate.interval == 4
    for _ in range(MIN_SAMPLES):  # measured: drafting 3 s per token, plain 1 s
        engine.gate.record(8, 24.0, 8, True)
        engine.gate.record(8, 8.0, 8, False)
    ids = [engine.add_request(p, params) for p in prompts]
    engine.step()  # the prompts' prefill: no decode, no gate decision
    finals, gated = {}, []
    while len(finals) < len(ids):
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if engine.last_step.num_seqs == 8:  # the gate's batch-8 decisions, in order
            gated.append(engine.last_step.gate_open)
    assert [finals[i].token_ids for i in ids] == expected
    # drafting stays the slower (the real steps' rates cannot catch up with 3 s against 1 s):
    # every step plain but the drafting probes, the first 4 steps in, then 4 x 2^k steps apart
    # (back to 4 after a probe whose own step beat the plain rate: that depends on this
    # machine's step times, so the gaps are checked, not their order)
    probes = [n for n, allowed in enumerate(gated) if allowed]
    assert len(gated) >= 8 and probes[0] == 3
    assert all(b - a in {4 * 2**k for k in range(4)} for a, b in zip(probes, probes[1:])), probes
    assert MAX_BACKOFF * 4 == 32
    assert engine.gate.drafting_pays(8) is False
    no_switch = make_engine(speculative=SpeculativeConfig(method="ngram", switch_off=False))
    assert no_switch.gate is None


def test_steps_that_also_prefill_follow_the_verdict_without_counting_or_probing():
    gate = BatchGate(interval=4)
    assert gate.allows_drafting(16, decide=False) is False  # nothing measured: plain
    assert gate.allows_drafting(7, decide=False) is True  # below MIN_BATCH: never gated
    assert gate.rates == {}  # no decision counted
    run(gate, 16, 40, drafting_s=2.0, plain_s=1.0)  # drafting measured to lose
    steps = gate.rates[16].num_steps
    assert [gate.allows_drafting(16, decide=False) for _ in range(8)] == [False] * 8  # no drafting probes
    assert gate.rates[16].num_steps == steps
    run(gate, 32, 40, drafting_s=1.0, plain_s=2.0)  # drafting measured to win at 32
    assert gate.allows_drafting(32, decide=False) is True


def test_a_closed_step_in_which_never_gated_requests_drafted_is_not_measured(make_engine, chat_ids):
    """A seeded sampled request is never gated: while the gate keeps the others plain it still
    drafts, and such a step is neither a plain nor a drafting sample."""
    engine = make_engine(speculative=SpeculativeConfig(method="ngram", max_tree_tokens=8, probe_interval=2))
    for _ in range(MIN_SAMPLES):  # measured: drafting 3 s per token, plain 1 s
        engine.gate.record(8, 24.0, 8, True)
        engine.gate.record(8, 8.0, 8, False)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)
    for i, prompt in enumerate(chat_ids[:8]):
        engine.add_request(prompt, seeded if i == 0 else greedy)
    engine.step()  # prefill
    counts = []
    while engine.has_unfinished():
        before = (engine.gate.rates[8].num_plain, engine.gate.rates[8].num_drafting)
        engine.step()
        after = (engine.gate.rates[8].num_plain, engine.gate.rates[8].num_drafting)
        if engine.last_step.num_seqs == 8:
            counts.append((engine.last_step.gate_open, engine.last_step.num_draft_tokens > 0, after != before))
    # closed steps that drafted (the seeded request) are never recorded; every other one is
    assert all(recorded == (gate_open or not drafted) for gate_open, drafted, recorded in counts)
    assert any(not gate_open and drafted for gate_open, drafted, _ in counts)


def test_drafting_must_win_by_the_margin():
    assert MARGIN == 0.1
    # 5% cheaper a token: inside the margin, so the bucket closes once both rates are known
    gate = BatchGate(interval=4)
    decisions = run(gate, 16, 40, drafting_s=0.95, plain_s=1.0)
    assert gate.drafting_pays(16) is False
    # learning alternates over steps 0-7, then drafting probes 4, 8, 16 steps apart
    assert [i for i, drafted in enumerate(decisions) if drafted] == [0, 2, 4, 6, 10, 18, 34]
    # 20% cheaper: open, but for the plain refresh probes
    gate = BatchGate(interval=4)
    decisions = run(gate, 16, 40, drafting_s=0.8, plain_s=1.0)
    assert [i for i, drafted in enumerate(decisions) if not drafted] == [1, 3, 5, 7, 15, 31]  # every 16th step plain
    assert gate.drafting_pays(16) is True
