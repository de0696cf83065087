"""Speculative decoding through the engine: greedy output identical to speculation off."""

import dataclasses

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


def test_commit_gathers_every_sequence_s_moves_for_one_gather_scatter():
    from types import SimpleNamespace

    import torch

    from specserve.cache.kv_cache import KVCache
    from specserve.cache.kv_cache_manager import KVCacheManager
    from specserve.engine.speculative import commit

    manager = KVCacheManager(16, 4, False)
    cache = KVCache(2, 16, 4, 1, 2, torch.float32, torch.device("cpu"))
    slots = cache.kv.view(2, 2, -1, 1, 2)  # [layers, k/v, slot, heads, head_dim]
    seqs, paths = [], {"a": (0, 2, 5), "b": (0,), "c": (0, 1, 4, 6)}
    for name, prefix_len in (("a", 3), ("b", 5), ("c", 6)):
        manager.add_sequence(name, list(range(prefix_len)))
        manager.allocate_slots(name, 0, prefix_len + 7)  # the prefix and a 7-node tree
        seqs.append(SimpleNamespace(request_id=name, token_ids=list(range(prefix_len + 1)), num_computed=prefix_len))
    for slot in range(16 * 4):
        slots[:, :, slot] = float(slot)
    node_slots = {s.request_id: [manager.slot(s.request_id, s.num_computed + n) for n in range(7)] for s in seqs}
    moves = ([], [])
    for seq in seqs:
        commit(manager, seq, seq.num_computed, paths[seq.request_id], moves)
    a, c = node_slots["a"], node_slots["c"]
    assert moves == ([a[2], a[5], c[4], c[6]], [a[1], a[2], c[2], c[3]])
    assert [s.num_computed for s in seqs] == [6, 6, 10]
    assert [len(manager.block_table(s.request_id)) for s in seqs] == [2, 2, 3]  # tree blocks past the path freed
    cache.move_slots(*moves)
    for seq in seqs:
        path, first = paths[seq.request_id], seq.num_computed - len(paths[seq.request_id])
        committed = [slots[0, 0, manager.slot(seq.request_id, first + depth), 0, 0].item() for depth in range(len(path))]
        assert committed == [float(node_slots[seq.request_id][node]) for node in path]


def test_a_failing_step_still_moves_committed_sequences_kv(make_engine, chat_ids, monkeypatch):
    """Sequence 1 commits (its blocks enter the prefix cache) and then sequence 2's
    detokenizing raises: the step's K/V moves are applied all the same, so the cached blocks
    hold path-ordered K/V. The moves are sequence 1's accepted-path slots."""
    import specserve.engine.llm_engine as llm_engine

    engine = make_engine(speculative=NGRAM)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    for ids in chat_ids[3:5]:
        engine.add_request(ids, params)
    while min((s.num_generated for s in engine.scheduler.running), default=0) < 8:
        engine.step()  # prefill, then a few decode steps, so the n-gram drafter has text to draft from
    applied, calls, real = [], [0], llm_engine._detokenize

    def failing(seq, tokens):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("detokenizer broke")
        return real(seq, tokens)

    monkeypatch.setattr(llm_engine, "_detokenize", failing)
    monkeypatch.setattr(engine.kv_cache, "move_slots", lambda src, dst: applied.append((list(src), list(dst))))
    with pytest.raises(RuntimeError, match="detokenizer broke"):
        engine.step()
    assert calls[0] == 2 and len(applied) == 1  # once, after sequence 1's commit, despite the error


def test_engine_outputs_keep_the_invariant_the_skip_relies_on(make_engine, chat_ids):
    """(The server's /metrics skips its per-depth loop on that.) Per output: accepted_per_depth sums to num_accepted_tokens, and neither shrinks between
    outputs of one request, so a step with no accepted draft moves no depth."""
    engine = make_engine(speculative=dataclasses.replace(NGRAM, switch_off=False))  # draft every step
    request_id = engine.add_request(chat_ids[3], SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))
    previous, moved = [], 0
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == request_id
            assert sum(out.accepted_per_depth) == out.num_accepted_tokens
            padded = previous + [0] * (len(out.accepted_per_depth) - len(previous))
            assert all(now >= before for now, before in zip(out.accepted_per_depth, padded))
            moved += out.accepted_per_depth != previous
            previous = list(out.accepted_per_depth)
    assert sum(previous) > 0 and moved > 0  # drafts were accepted: the check saw depths move
