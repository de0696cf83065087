"""Collective boost-tuning: later drafts' prompt weights favour what earlier drafts missed."""

import pytest
import torch

from draft_models.boost import boost_weights, prompt_coverage
from draft_models.distill import TrainConfig, lr_factor, sample_batch
from draft_models.distill_data import TeacherSet, length_batches

# three prompts; prompt 0 has two sequences (greedy + sampled), prompts 1 and 2 one each
PROMPT_INDEX = (0, 0, 1, 2)
DRAFT_1 = [torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([0, 3, 0, 1]), torch.tensor([2, 2, 9, 4])]
DRAFT_2 = [torch.tensor([1, 1]), torch.tensor([0, 5]), torch.tensor([1, 0, 2, 2]), torch.tensor([0, 0, 1, 1])]


def test_second_draft_weights_favour_the_first_drafts_worst_prompts():
    coverage = prompt_coverage([DRAFT_1], PROMPT_INDEX, 4)
    assert coverage == [1.0, 0.5, 0.0, None]  # prompt 3 has no rows (held back, say)
    weights = boost_weights(coverage, floor=0.25)
    # misses 0, 0.5, 1 (mean 0.5): 0.25 + 0.75 * miss / 0.5
    assert weights == [0.25, 1.0, 1.75, 1.0]


def test_coverage_is_collective_over_earlier_drafts():
    # draft 2 adds row 1 of prompt 1 and rows 0, 1 of prompt 2 to what draft 1 got right
    coverage = prompt_coverage([DRAFT_1, DRAFT_2], PROMPT_INDEX, 3)
    assert coverage == [1.0, 0.75, 0.5]
    assert boost_weights(coverage, floor=0.0) == [0.0, 1.0, 2.0]  # misses 0, 0.25, 0.5 (mean 0.25)


def test_uniform_weights_without_misses_and_floor_checked():
    assert boost_weights([1.0, 1.0, None], floor=0.3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        boost_weights([0.5], floor=1.5)


def _teacher(lengths):
    ids = tuple(torch.arange(n) for n in lengths)
    cu = [0]
    for _ in lengths:
        cu.append(cu[-1] + 2)
    return TeacherSet(ids, (0,) * len(lengths), tuple(cu), tuple(range(len(lengths))),
                      torch.zeros(cu[-1], 4), torch.zeros(cu[-1], dtype=torch.int64))


def test_batches_draw_only_weighted_sequences_up_to_the_token_budget():
    teacher = _teacher([10, 10, 10])
    chosen = sample_batch(teacher, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), 35, torch.Generator().manual_seed(0))
    assert chosen == [2, 2, 2, 2]


def test_length_batches_and_schedule():
    assert list(length_batches([5, 1, 3, 9], 10)) == [[1, 2], [0], [3]]
    cfg = TrainConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0.0, 0, cfg) == pytest.approx(0.1)
    assert lr_factor(0.0, 20, cfg) == pytest.approx(1.0)
    assert lr_factor(0.5, 20, cfg) == pytest.approx(0.55)
    assert lr_factor(1.0, 20, cfg) == pytest.approx(0.1)
