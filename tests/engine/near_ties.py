"""Where two greedy token streams of one model part (bf16 graphs against eager, fused kernels
against PyTorch ops), whether they part at a near-tie: the gap between the two tokens' logits
at the first differing position, read from one reference forward.

A gap within a few roundings of the logits' dtype is a near-tie: summing in another order may
pick either token. A large gap would be a bug, not rounding.
"""

from __future__ import annotations

from specserve.engine.model_runner import prompt_logits
from specserve.models.llama import LlamaForCausalLM

NEAR_TIE = 0.5  # logits of SmolLM2 reach ~30, where one bf16 rounding step is 0.125


def first_divergence_gaps(
    model: LlamaForCausalLM, prompts: list[list[int]], outs_a: list[list[int]], outs_b: list[list[int]]
) -> list[float]:
    """Per pair of outputs that part, |logit(a_k) - logit(b_k)| at their first differing
    position k, from ``model``'s logits after the prompt and the common prefix."""
    gaps = []
    for prompt, a, b in zip(prompts, outs_a, outs_b):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            continue
        logits = prompt_logits(model, list(prompt) + list(a[:k]))[-1]
        gaps.append(abs(logits[a[k]] - logits[b[k]]).item())
    return gaps
