"""From logits to a distribution under the request's controls, and drawing from it.

``target_probs`` is THE processed distribution: plain sampling draws from it, and
speculative verification judges drafts against it, so both produce the same output law.
"""

from __future__ import annotations

import torch

from specserve.config import SamplingParams


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[num_rows, vocab] float32 logits -> probabilities after temperature, top-k, top-p.

    Ties at the top-k / top-p boundary are kept (every token whose logit equals the cut-off's).
    temperature 0 is handled by callers (argmax), not here.
    """
    logits = logits.float() / max(params.temperature, 1e-5)
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        # keep the smallest set of most likely tokens whose mass reaches top_p
        kept = mass_before < params.top_p
        cutoff = sorted_probs.masked_fill(~kept, float("inf")).min(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < cutoff, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_token(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from probs [vocab] with the request's own generator (reproducible per seed)."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The token after one position: argmax when greedy, else a draw from ``target_probs``."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    return sample_token(target_probs(logits[None], params)[0], generator)
