"""Speculative decoding through the engine: greedy output identical to speculation off."""

import pytest

from specserve.config import SamplingParams, SpeculativeConfig

NGRAM = SpeculativeConfig(method="ngram", max_tree_tokens=8, max_depth=4, widths=(2, 1, 1, 1))


@pytest.mark.slow
def test_greedy_speculation_is_token_identical_on_20_prompts(make_engine, chat_ids):
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    assert len(chat_ids) == 20
    plain = make_engine().generate(chat_ids, params)
    engine = make_engine(speculative=NGRAM)
    spec = engine.generate(chat_ids, params)
    for i, (a, b) in enumerate(zip(plain, spec)):
        assert a.token_ids == b.token_ids, f"prompt {i} differs"
    assert all(o.num_generated_tokens == 128 for o in spec)
    # speculation really ran: drafts were proposed and some accepted, so fewer steps than tokens
    assert sum(o.num_draft_tokens for o in spec) > 0
    assert sum(o.num_accepted_tokens for o in spec) > 0
    assert sum(o.num_steps for o in spec) < sum(o.num_steps for o in plain) == 20 * 127
    assert engine.kv_manager.pool.num_free_blocks == engine.kv_manager.pool.num_blocks


def test_speculative_sampling_reproducible_with_seed(make_engine, chat_ids):
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True)
    a = make_engine(speculative=NGRAM).generate(chat_ids[3:6], params)
    b = make_engine(speculative=NGRAM).generate(chat_ids[3:6], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(o.num_generated_tokens == 24 for o in a)


def test_stats_count_steps_and_depths(make_engine, chat_ids):
    out = make_engine(speculative=NGRAM).generate([chat_ids[3]], SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))[0]
    # every generated token after the first came from a step: accepted drafts plus one bonus each
    assert out.num_steps + out.num_accepted_tokens == out.num_generated_tokens - 1
    assert sum(out.accepted_per_depth) == out.num_accepted_tokens
    assert out.accepted_per_depth == sorted(out.accepted_per_depth, reverse=True)
    assert out.mean_accepted_length == 1 + out.num_accepted_tokens / out.num_steps
