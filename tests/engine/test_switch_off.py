"""The per-request switch-off rule on a synthetic cost curve: exact decisions and counters."""

from specserve.engine.calibration import StepCost
from specserve.engine.switch_off import (
    MAX_INTERVAL_FACTOR,
    PRIOR_HISTORY,
    PRIOR_STEPS,
    AcceptancePrior,
    DraftStep,
    SwitchOff,
    speculation_pays,
)

COST = StepCost((1, 9), (1.0, 2.0))  # 8 drafts double a lone step


def bad(num_drafts: int = 8) -> DraftStep:
    return DraftStep(num_drafts, num_accepted=0, num_other_tokens=0, draft_s=0.0)


def good() -> DraftStep:
    return DraftStep(8, num_accepted=3, num_other_tokens=0, draft_s=0.0)  # 4 tokens for 2 s


def test_speculation_pays_compares_seconds_per_token():
    assert speculation_pays([good()], COST)  # 0.5 s per token against 1.0
    assert not speculation_pays([bad()], COST)  # 2.0 against 1.0
    assert speculation_pays([DraftStep(8, 1, 0, 0.0)], COST)  # 1.0 against 1.0: a tie pays
    assert not speculation_pays([DraftStep(8, 1, 0, 0.5)], COST)  # drafting time counts
    assert speculation_pays([good(), bad()], COST)  # 4 s for 5 tokens
    assert speculation_pays([good(), bad(), bad()], COST)  # 6 s for 6 tokens: a tie
    assert not speculation_pays([good(), bad(), bad(), bad()], COST)  # 8 s for 7 tokens


def test_the_other_rows_of_the_batch_count():
    flat_then_steep = StepCost((1, 8, 16), (1.0, 1.0, 2.0))
    alone = DraftStep(7, num_accepted=0, num_other_tokens=0, draft_s=0.0)
    assert speculation_pays([alone], flat_then_steep)  # 8 rows cost what 1 does
    in_batch = DraftStep(7, num_accepted=0, num_other_tokens=8, draft_s=0.0)
    assert not speculation_pays([in_batch], flat_then_steep)  # 16 rows against 9


def test_switches_off_after_half_a_window_of_losing_steps():
    state = SwitchOff(window=4, base_interval=3)
    state.record(bad(), COST)
    assert not state.off and state.wants_drafts()
    state.record(None, COST)  # a step the drafter proposed nothing for: no information
    assert not state.off and state.num_off_steps == 0
    state.record(bad(), COST)
    assert state.off and not state.wants_drafts()
    assert (state.num_switch_offs, state.num_switch_ons, state.num_probes) == (1, 0, 0)


def test_probes_every_interval_doubling_on_failure_and_switches_back_on():
    state = SwitchOff(window=4, base_interval=2)
    state.record(bad(), COST)
    state.record(bad(), COST)
    wants = []
    for step in [None, None, bad(), None, None, None, None, bad(), *[None] * 8, bad(), *[None] * 16]:
        wants.append(state.wants_drafts())
        state.record(step, COST)
    # intervals 2, 4, 8, then capped at 8 * 2 = 16
    assert wants[:8] == [False, False, True, False, False, False, False, True]
    assert wants[8:17] == [False] * 8 + [True]
    assert wants[17:] == [False] * 16 and state.wants_drafts()
    assert state.interval == MAX_INTERVAL_FACTOR * 2
    assert (state.num_probes, state.num_off_steps, state.num_switch_ons) == (3, 30, 0)
    state.record(good(), COST)  # a probe that pays
    assert not state.off and state.wants_drafts() and state.interval == 2
    assert (state.num_probes, state.num_switch_ons) == (4, 1)
    assert list(state.recent) == [good()]
    state.record(bad(), COST)  # with the probe in the window: 4 s for 5 tokens, still on
    assert not state.off


def test_the_window_slides():
    state = SwitchOff(window=4, base_interval=2)
    for _ in range(4):
        state.record(good(), COST)
    for _ in range(2):
        state.record(bad(), COST)  # 2 good + 2 bad: 8 s for 10 tokens, pays
    assert not state.off
    state.record(bad(), COST)  # 1 good + 3 bad: 8 s for 7 tokens against 1.0
    assert state.off and len(state.recent) == 0


def test_each_step_is_costed_once_however_long_the_window():
    """A decision reads the whole window, but each step's seconds are taken from the cost curve
    once, when it is recorded (two curve reads: with and without its drafts)."""
    calls = []

    def cost(num_tokens: int) -> float:
        calls.append(num_tokens)
        return COST(num_tokens)

    state = SwitchOff(window=8, base_interval=2)
    for _ in range(20):
        state.record(good(), cost)
    assert len(calls) == 2 * 20 and not state.off
    assert list(state.recent_seconds) == [good().seconds(COST)] * 8 and len(state.recent) == 8


def test_the_engine_wide_prior_shrinks_the_request_s_tokens():
    """Two losing steps (4 s, 2 tokens) against 1 s/token plain: alone they lose; with a prior of
    m tokens per step worth PRIOR_STEPS = 2 steps the tokens become (2 + 2 m) * 2 / 4, which pays
    from m = 3 on; a prior of 1 token per step (a drafter failing everywhere) changes nothing."""
    assert PRIOR_STEPS == 2
    assert not speculation_pays([bad(), bad()], COST)
    assert speculation_pays([bad(), bad()], COST, prior=3.0)  # 4 s for 4 tokens: a tie
    assert not speculation_pays([bad(), bad()], COST, prior=2.99)
    assert not speculation_pays([bad(), bad()], COST, prior=1.0)
    # eight losing steps outweigh the same prior: 16 s for (8 + 6) * 8 / 10 = 11.2 tokens
    assert not speculation_pays([bad()] * 8, COST, prior=3.0)


def test_acceptance_prior_is_the_mean_of_the_last_steps():
    prior = AcceptancePrior()
    assert prior.mean is None
    prior.add(good())  # 4 tokens
    prior.add(bad())  # 1 token
    assert prior.mean == 2.5
    for _ in range(PRIOR_HISTORY):
        prior.add(bad())
    assert prior.mean == 1.0 and len(prior.recent) == PRIOR_HISTORY


def test_acceptance_prior_pays_over_every_request_s_steps_once_enough_are_known():
    prior = AcceptancePrior()
    for _ in range(3):
        prior.add(bad())
    assert prior.pays(COST, min_steps=4)  # too few steps to judge
    prior.add(bad())
    assert not prior.pays(COST, min_steps=4)  # 8 s for 4 tokens against 1 s per token
    for _ in range(4):
        prior.add(good())
    assert prior.pays(COST, min_steps=4)  # 16 s for 20 tokens


def test_acceptance_prior_costs_each_step_once_and_decides_as_over_the_whole_history():
    import random

    curve = StepCost((1, 2, 4, 8, 16, 32, 64, 128, 256), (1.0, 1.01, 1.02, 1.05, 1.1, 1.3, 1.7, 2.6, 4.5))
    rng = random.Random(5)
    prior = AcceptancePrior()
    decisions, reference = [], []
    for index in range(3 * PRIOR_HISTORY):
        drafts = rng.randint(1, 16)
        accepted = 0 if PRIOR_HISTORY <= index < 2 * PRIOR_HISTORY else rng.randint(0, drafts)  # a losing stretch
        prior.add(DraftStep(drafts, accepted, rng.randint(0, 300), rng.random() * 0.01))
        decisions.append(prior.pays(curve, min_steps=8))
        reference.append(len(prior.recent) < 8 or speculation_pays(list(prior.recent), curve))
    assert decisions == reference and True in decisions and False in decisions
    assert list(prior.recent_seconds) == [step.seconds(curve) for step in prior.recent]
    assert len(prior.recent_seconds) == PRIOR_HISTORY
    # another curve: every kept step is costed again under it
    assert prior.pays(COST, min_steps=8) == speculation_pays(list(prior.recent), COST)
    assert list(prior.recent_seconds) == [step.seconds(COST) for step in prior.recent]


def test_a_request_can_start_off_probing_at_once_then_at_the_longest_interval():
    state = SwitchOff.starting_off(window=8, base_interval=2)
    assert state.off and state.interval == MAX_INTERVAL_FACTOR * 2 and state.num_switch_offs == 1
    assert state.wants_drafts()  # the first probe
    state.record(None, COST)  # the drafter proposed nothing: the probe is still due
    assert state.wants_drafts() and state.num_probes == 0
    state.record(bad(), COST)  # a failed probe: the interval stays at its longest
    assert state.off and state.num_probes == 1 and state.interval == MAX_INTERVAL_FACTOR * 2
    wants = []
    for _ in range(MAX_INTERVAL_FACTOR * 2 + 1):
        wants.append(state.wants_drafts())
        state.record(None, COST)
    assert wants == [False] * (MAX_INTERVAL_FACTOR * 2) + [True]
    state.record(good(), COST)  # the probe pays: on
    assert not state.off and state.interval == 2 and state.num_switch_ons == 1


def test_a_good_prior_keeps_a_request_on_through_a_bad_start_and_a_bad_one_does_not():
    lucky = SwitchOff(window=4, base_interval=2)
    lucky.record(bad(), COST, prior=3.0)  # 2 s for (1 + 6) / 3 = 2.33 tokens: on
    lucky.record(bad(), COST, prior=3.0)  # 4 s for 4 tokens: a tie, on
    assert not lucky.off
    lucky.record(bad(), COST, prior=3.0)  # 6 s for (3 + 6) * 3 / 5 = 5.4 tokens: off
    assert lucky.off
    unlucky = SwitchOff(window=4, base_interval=2)
    unlucky.record(bad(), COST, prior=1.0)  # 1 step + 2 pseudo-steps: half a window, 2 s a token
    assert unlucky.off
    # a probe is judged with the prior too: one losing probe switches back on under a good prior
    unlucky.record(None, COST)
    unlucky.record(None, COST)
    assert unlucky.wants_drafts()
    unlucky.record(bad(), COST, prior=4.0)  # 2 s for (1 + 8) / 3 = 3 tokens
    assert not unlucky.off and unlucky.num_switch_ons == 1


def test_the_prior_counts_towards_half_a_window():
    """Window 8: alone a request decides after 4 drafting steps; with a prior (2 pseudo-steps)
    after 2."""
    alone, with_prior = SwitchOff(window=8, base_interval=2), SwitchOff(window=8, base_interval=2)
    for steps in range(1, 5):
        alone.record(bad(), COST)
        with_prior.record(bad(), COST, prior=1.0)
        assert alone.off == (steps == 4) and with_prior.off == (steps >= 2)
        if with_prior.off:
            with_prior.record(None, COST)  # off: plain steps until the probe
