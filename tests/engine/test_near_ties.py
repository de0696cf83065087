"""The near-tie helper of the GPU tests, on the CPU: the gap is read at the first differing position."""

from __future__ import annotations

from specserve.engine.model_runner import prompt_logits
from tests.engine.near_ties import first_divergence_gaps

PROMPT = [1, 504, 3575, 282]


def test_gap_at_the_first_differing_position(smollm):
    gaps = first_divergence_gaps(smollm.model, [PROMPT, PROMPT], [[10, 11, 12], [5, 6]], [[10, 13, 99], [5, 6]])
    logits = prompt_logits(smollm.model, PROMPT + [10])[-1]
    assert gaps == [abs(logits[11] - logits[13]).item()]  # the identical pair gives no gap
