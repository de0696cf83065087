"""Simulated acceptance from teacher-forced ranks (exact, hand-checked)."""

import torch

from draft_models.evaluate import (
    TREE_WIDTHS,
    accepted_run,
    heldout_metrics,
    mean_accepted_length,
    simulated_steps,
    sum_tree_nodes,
)

# ranks of the target's token under the draft at output tokens 0..7 (0: the draft's top-1 agrees)
RANKS = [5, 0, 0, 1, 0, 0, 0, 3]


def test_chain_steps_start_after_the_prefill_token():
    chain4 = (1, 1, 1, 1)
    # step 1 at token 1: tokens 1, 2 agree, 3 does not -> 2 drafts + bonus (token 3)
    assert accepted_run(RANKS, 1, chain4) == 2
    # step 2 at token 4: 4, 5, 6 agree; token 7 is the last, so at most 2 drafts remain before it
    assert accepted_run(RANKS, 4, chain4) == 3
    assert simulated_steps(RANKS, chain4) == 2  # 7 tokens (1..7) in 2 steps
    assert simulated_steps(RANKS, (1,)) == 4  # depth 1: steps start at tokens 1, 3, 4, 6
    assert mean_accepted_length([RANKS], chain4) == 3.5
    assert mean_accepted_length([RANKS, [0, 0]], chain4) == 8 / 3


def test_tree_widths_accept_lower_ranks_at_each_depth():
    # width 2 at depth 1 lets token 3 (rank 1) through when a step starts there
    assert accepted_run(RANKS, 3, (2, 1, 1, 1)) == 4
    assert accepted_run(RANKS, 3, (1, 1, 1, 1)) == 0
    assert sum_tree_nodes(TREE_WIDTHS) == 60
    assert sum_tree_nodes((2, 2, 1)) == 2 + 4 + 4


def test_heldout_metrics_counts():
    metrics = heldout_metrics([torch.tensor(RANKS)])
    assert metrics["top1_agreement"] == 0.625
    assert metrics["top4_agreement"] == 0.875
    assert metrics["chain_mean_accepted_length"]["4"] == 3.5
    assert metrics["static_tree"]["num_draft_nodes"] == 60


def test_engine_acceptance_measures_the_drafter_with_switch_off_off(monkeypatch):
    """The engine figure is the drafter's own: neither the per-request switch-off nor the batch
    gate (which only exists with it) may stop steps from drafting."""
    import specserve.engine.llm_engine as llm_engine
    from draft_models.evaluate import engine_acceptance
    from specserve.config import SpeculativeConfig

    seen = []

    class Output:
        token_ids, num_steps, num_accepted_tokens, mean_accepted_length = [7, 8, 9], 2, 1, 1.5

    class FakeEngine:
        def __init__(self, config, loaded):
            seen.append(config.speculative)

        def generate(self, prompts, params):
            return [Output() for _ in prompts]

    monkeypatch.setattr(llm_engine, "LLMEngine", FakeEngine)
    spec = SpeculativeConfig(tree="dynamic", top_k=4, max_tree_tokens=64, max_depth=8)
    assert spec.switch_off  # the default, which the evaluation must override
    result = engine_acceptance(None, "some/draft", [(1, 2, 3)], [(7, 8, 9)], 16, spec, 4)
    assert [(s.method, s.draft_model, s.switch_off) for s in seen] == [("draft", "some/draft", False)]
    assert (result["mean_accepted_length"], result["identical_to_greedy"]) == (1.5, 1)
