"""Per-request speculation through the engine: clamped budgets, switch-off, exactness under controls.

The switch-off decisions depend on the step-cost curve; these tests give the engine a fixed curve
(a file, as ``--speculative-config '{"step_cost": ...}'`` does), so they do not depend on timing.
"""

import json
import random
from dataclasses import replace

import pytest

from specserve.config import SamplingParams, SpeculationParams, SpeculativeConfig
from specserve.engine.sequence import NO_SPECULATION
from specserve.engine.switch_off import AcceptancePrior

# one step costs 0.1 s plus 12.5 ms per extra tree token: a 17-token tree triples it
COST = {"sizes": [1, 2, 4, 8, 16, 32], "seconds": [0.1 + 0.0125 * (n - 1) for n in (1, 2, 4, 8, 16, 32)]}
CONTROLS = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3, logit_bias=((198, -2.0),))
REPEATING = "one two three four five six seven eight nine ten. " * 3 + "one two three"


@pytest.fixture(scope="module")
def ngram(tmp_path_factory):
    """An ngram config (8 nodes, depth 4) with the fixed cost curve."""
    cost_file = tmp_path_factory.mktemp("cost") / "cost.json"
    cost_file.write_text(json.dumps(COST))
    return SpeculativeConfig(method="ngram", max_tree_tokens=8, max_depth=4, widths=(2, 1, 1, 1),
                             step_cost=str(cost_file))


@pytest.fixture(scope="module")
def spec_engine(make_engine, ngram):
    return make_engine(speculative=ngram)


def test_a_request_lowers_the_servers_limits_and_cannot_raise_them(spec_engine, make_engine):
    resolve = spec_engine.resolve_speculation
    assert resolve(None) == SpeculationParams(True, 8, 4, ("ngram",))
    assert resolve(SpeculationParams(max_tree_tokens=3, max_depth=2)) == SpeculationParams(True, 3, 2, ("ngram",))
    assert resolve(SpeculationParams(max_tree_tokens=10**9, max_depth=99)) == SpeculationParams(True, 8, 4, ("ngram",))
    assert resolve(SpeculationParams(drafters=("ngram", "draft"))) == SpeculationParams(True, 8, 4, ("ngram",))
    for off in (SpeculationParams(enabled=False), SpeculationParams(max_tree_tokens=0),
                SpeculationParams(max_depth=0), SpeculationParams(drafters=("early_exit",)),
                SpeculationParams(drafters=())):
        assert resolve(off) == NO_SPECULATION
    assert make_engine().resolve_speculation(SpeculationParams(max_tree_tokens=4)) == NO_SPECULATION


def test_request_budgets_bound_every_step(spec_engine, make_engine):
    prompt = spec_engine.tokenize(REPEATING)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = make_engine().generate([prompt], params)[0]
    full = spec_engine.generate([prompt], params)[0]
    assert full.token_ids == plain.token_ids and len(full.accepted_per_depth) > 1

    request_id = spec_engine.add_request(prompt, params, speculation=SpeculationParams(max_tree_tokens=2, max_depth=1))
    draft_counts, final = [], None
    while final is None:
        outputs = spec_engine.step()
        draft_counts.append(spec_engine.last_step.num_draft_tokens)
        final = next((o for o in outputs if o.request_id == request_id and o.finished), None)
    assert final.token_ids == plain.token_ids
    assert max(draft_counts) == 2 and len(final.accepted_per_depth) == 1  # 2 nodes at depth 1
    assert final.speculation == SpeculationParams(True, 2, 1, ("ngram",))

    disabled = spec_engine.generate([prompt], params, SpeculationParams(enabled=False))[0]
    assert disabled.token_ids == plain.token_ids and disabled.num_draft_tokens == 0


def test_greedy_with_controls_is_the_same_with_speculation_on_and_off(spec_engine, make_engine, chat_ids):
    """Penalties and biases steer greedy decoding; each tree node's row must count its own path."""
    prompts = [spec_engine.tokenize(REPEATING), *chat_ids[2:5]]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, **CONTROLS)
    plain = make_engine().generate(prompts, params)
    spec = spec_engine.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert sum(o.num_accepted_tokens for o in spec) > 0
    unpenalised = make_engine().generate(prompts[:1], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))
    assert unpenalised[0].token_ids != plain[0].token_ids  # the controls do change the text


def test_a_stop_string_ends_the_tokens_where_plain_decoding_does(spec_engine, make_engine):
    prompt = spec_engine.tokenize(REPEATING)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(" six",))
    plain = make_engine().generate([prompt], params)[0]
    spec = spec_engine.generate([prompt], params)[0]
    assert spec.num_accepted_tokens > 0  # the stop string falls inside an accepted run of drafts
    assert (spec.token_ids, spec.text, spec.finish_reason) == (plain.token_ids, plain.text, "stop")


def test_seeded_sampling_with_controls_reproduces_with_speculation(make_engine, ngram, chat_ids):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, min_p=0.02, seed=11,
                            ignore_eos=True, **CONTROLS)
    a = make_engine(speculative=ngram).generate(chat_ids[5:8], params)
    b = make_engine(speculative=ngram).generate(chat_ids[5:8], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(o.num_generated_tokens == 24 for o in a)


def random_alphabet_prompts(num_prompts: int, length: int = 128, alphabet: int = 24, seed: int = 0) -> list[list[int]]:
    """Random tokens from a small alphabet: every token recurs, so the ngram drafter always finds a
    match, but what followed it before is noise (the set built to defeat the drafter)."""
    rng = random.Random(seed)
    letters = rng.sample(range(256, 32000), alphabet)
    return [[rng.choice(letters) for _ in range(length)] for _ in range(num_prompts)]


def test_switch_off_engages_on_random_tokens(make_engine, ngram):
    prompts = random_alphabet_prompts(4)
    params = SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True)
    outs = make_engine(speculative=ngram).generate(prompts, params)
    assert sum(o.num_switch_offs for o in outs) >= 2
    assert sum(o.num_switched_off_steps for o in outs) > 0
    assert sum(o.num_accepted_tokens for o in outs) <= sum(o.num_draft_tokens for o in outs) // 4
    always = replace(ngram, switch_off=False)
    outs_always = make_engine(speculative=always).generate(prompts, params)
    assert sum(o.num_switch_offs for o in outs_always) == 0
    assert sum(o.num_draft_tokens for o in outs_always) > sum(o.num_draft_tokens for o in outs)


def test_a_seeded_sampled_request_is_never_switched_off(spec_engine):
    """Its text must reproduce, and the switch-off decision rests on timings and other requests."""
    prompt = random_alphabet_prompts(1)[0]
    seeded = spec_engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=1.0, seed=5))
    unseeded = spec_engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=1.0))
    greedy = spec_engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0.0, seed=5))
    states = {r: spec_engine.sequences[r].switch_off for r in (seeded, unseeded, greedy)}
    assert states[seeded] is None and states[unseeded] is not None and states[greedy] is not None
    for request_id in states:
        spec_engine.abort(request_id)


def test_requests_start_off_while_the_drafters_lose_engine_wide(make_engine, ngram, tmp_path):
    """One request after another on random tokens, on a device where every tree token costs half a
    step: once the engine has seen a window of losing drafting steps, a new request starts
    switched off (counted once), probes once, fails, and at the longest probe interval (8 x 16
    steps) drafts no more in 40 tokens."""
    steep = tmp_path / "steep.json"
    steep.write_text(json.dumps({"sizes": [1, 32], "seconds": [0.1, 0.1 + 0.05 * 31]}))
    engine = make_engine(speculative=replace(ngram, step_cost=str(steep)))
    params = SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True)
    prompts = random_alphabet_prompts(10, seed=1)
    while len(engine.acceptance_priors.get(("ngram",), AcceptancePrior()).recent) < ngram.switch_off_window:
        engine.generate([prompts.pop()], params)  # starts on: its drafting steps join the record
    assert not engine.acceptance_priors[("ngram",)].pays(engine.step_cost, ngram.switch_off_window)
    last = engine.generate([prompts.pop()], params)[0]
    assert (last.num_switch_offs, last.num_switch_ons, last.num_probe_steps) == (1, 0, 1)
    assert last.num_switched_off_steps == last.num_steps - 1  # every step but the probe
