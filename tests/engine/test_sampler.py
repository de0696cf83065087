"""The sampling controls: exact values, and the same law as transformers' logits processors."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specserve.config import SamplingParams
from specserve.engine.sampler import next_token, shape_logits, target_probs
from specserve.errors import RequestError

LOGITS = torch.tensor([[2.0, -1.0, 0.5, 0.0]])


def test_logit_bias_adds_to_the_named_tokens():
    params = SamplingParams(logit_bias=((1, 3.0), (3, -0.5)))
    assert shape_logits(LOGITS, params).tolist() == [[2.0, 2.0, 0.5, -0.5]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    params = SamplingParams(repetition_penalty=2.0)
    counts = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # token 1 generated
    prompt_mask = torch.tensor([True, False, False, False])  # token 0 in the prompt
    assert shape_logits(LOGITS, params, counts, prompt_mask).tolist() == [[1.0, -2.0, 0.5, 0.0]]


def test_frequency_and_presence_penalties_read_generated_counts_only():
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    prompt_mask = torch.tensor([True, True, True, True])  # the prompt does not count for these two
    assert shape_logits(LOGITS, params, counts, prompt_mask).tolist() == [[2.0, -3.0, -1.0, 0.0]]


def test_each_row_uses_its_own_counts():
    params = SamplingParams(frequency_penalty=1.0)
    counts = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    shaped = shape_logits(LOGITS.expand(2, -1), params, counts, torch.zeros(4, dtype=torch.bool))
    assert shaped.tolist() == [[2.0, -1.0, 0.5, 0.0], [-1.0, -1.0, 0.5, 0.0]]


def test_penalties_without_counts_is_an_error():
    with pytest.raises(ValueError, match="output counts"):
        shape_logits(LOGITS, SamplingParams(presence_penalty=0.5))


def test_min_p_keeps_tokens_within_a_fraction_of_the_likeliest():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = target_probs(logits, SamplingParams(min_p=0.3))  # keeps p >= 0.15
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


@pytest.mark.parametrize("seed", range(5))
def test_the_controls_match_transformers_processors(seed: int):
    """Temperature, min-p, top-k, top-p (in that order) and the repetition penalty."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(6, 50, generator=generator)
    history = torch.randint(0, 50, (6, 12), generator=generator)  # prompt 8 + generated 4, per row
    params = SamplingParams(temperature=0.7, min_p=0.02, top_k=20, top_p=0.85, repetition_penalty=1.3)
    counts = torch.zeros(6, 50).scatter_add_(1, history[:, 8:], torch.ones(6, 4))
    prompt_mask = torch.zeros(6, 50, dtype=torch.bool).scatter_(1, history[:, :8], True)
    ours = target_probs(shape_logits(logits, params, counts, prompt_mask), params)

    scores = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    for warper in (TemperatureLogitsWarper(0.7), MinPLogitsWarper(0.02), TopKLogitsWarper(20),
                   TopPLogitsWarper(0.85)):
        scores = warper(history, scores)
    torch.testing.assert_close(ours, torch.softmax(scores, dim=-1))
    assert bool(((ours > 0).sum(-1) < 20).any())  # the cuts really cut


def test_greedy_takes_the_argmax_after_bias_and_penalties():
    generator = torch.Generator().manual_seed(0)
    counts, prompt_mask = torch.tensor([0.0, 0.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.bool)
    assert next_token(LOGITS[0], SamplingParams(temperature=0), generator) == 0
    assert next_token(LOGITS[0], SamplingParams(temperature=0, logit_bias=((2, 2.0),)), generator) == 2
    counts[0] = 2
    params = SamplingParams(temperature=0, frequency_penalty=1.0)
    assert next_token(LOGITS[0], params, generator, counts, prompt_mask) == 2  # 2 - 2 < 0.5


@pytest.mark.parametrize(
    ("field", "value"),
    [("min_p", 1.5), ("min_p", -0.1), ("presence_penalty", 2.5), ("frequency_penalty", -3.0),
     ("repetition_penalty", 0.0), ("repetition_penalty", 11.0), ("logit_bias", ((3, 101.0),)),
     ("logit_bias", ((-1, 1.0),)), ("logit_bias", ((4, 1.0), (2, 1.0))), ("logit_bias", ((2, 1.0), (2, 2.0))),
     ("temperature", float("inf"))],
)
def test_out_of_range_controls_name_their_field(field: str, value):
    with pytest.raises(RequestError) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
