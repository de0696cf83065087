"""From logits to a distribution under the request's controls, and drawing from it.

Two stages, in the order of ``SamplingParams``' docstring (vLLM's order):

    shape_logits   logit_bias, then the penalties, which read the tokens so far: [rows, vocab]
                   counts of generated tokens and a mask of prompt tokens, one row per logits
                   row (a tree node's row counts the tokens on its path; see ``token_counts``)
    target_probs   temperature, softmax, min-p, top-k, top-p

``target_probs(shape_logits(...))`` is THE processed distribution: plain sampling draws from
it, and speculative verification judges drafts against it, so both produce the same output
law. Greedy decoding takes the argmax of ``shape_logits`` (penalties and biases steer it too).
"""

from __future__ import annotations

import torch

from specserve.config import SamplingParams


def shape_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    output_counts: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[rows, vocab] logits -> float32 logits after logit_bias and the penalties.

    ``output_counts`` [rows, vocab]: occurrences of each token among the generated tokens
    before the row's position; ``prompt_mask`` [vocab] or [rows, vocab] bool: tokens of the
    prompt. Both are required when ``params.uses_history``.

        logit_bias          l[x] += bias[x]
        repetition_penalty  for x in prompt or generated: l[x] /= r if l[x] > 0 else l[x] *= r
        frequency/presence  l[x] -= frequency * count[x] + presence * [count[x] > 0]
    """
    logits = logits.float()
    if params.logit_bias:
        ids = torch.tensor([token_id for token_id, _ in params.logit_bias], device=logits.device)
        bias = torch.tensor([value for _, value in params.logit_bias], device=logits.device)
        logits = logits.index_add(-1, ids, bias.expand(*logits.shape[:-1], -1))
    if not params.uses_history:
        return logits
    if output_counts is None or prompt_mask is None:
        raise ValueError("penalties need the output counts and the prompt mask of every row")
    counts = output_counts.to(logits.dtype)
    if params.repetition_penalty != 1:
        seen = (counts > 0) | prompt_mask
        penalised = torch.where(logits > 0, logits / params.repetition_penalty,
                                logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.frequency_penalty != 0:
        logits = logits - params.frequency_penalty * counts
    if params.presence_penalty != 0:
        logits = logits - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[num_rows, vocab] shaped logits -> probabilities after temperature, min-p, top-k, top-p.

    min-p drops tokens below ``min_p`` times the likeliest token's probability; top-k keeps the
    k likeliest left; top-p the smallest set of the likeliest left whose mass reaches top_p.
    Ties at the top-k / top-p boundary are kept (every token whose value equals the cut-off's).
    temperature 0 is handled by callers (argmax), not here.
    """
    logits = logits.float() / max(params.temperature, 1e-5)
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        threshold = params.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.min_p > 0 or params.top_k:
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


def next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    output_counts: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
) -> int:
    """The token after one position (logits [vocab]; counts [vocab] when params.uses_history):
    argmax of the shaped logits when greedy, else a draw from the processed distribution."""
    counts = None if output_counts is None else output_counts[None]
    shaped = shape_logits(logits[None], params, counts, prompt_mask)
    if params.greedy:
        return int(torch.argmax(shaped).item())
    return sample_token(target_probs(shaped, params)[0], generator)
