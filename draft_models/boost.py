"""Collective boost-tuning (SpecInfer, Miao et al. ASPLOS'24, section 3): draft k+1 trains on
the prompts that drafts 1..k, taken together, got wrong.

SpecInfer merges the drafts' trees, so a position is covered when ANY earlier draft's top-1
equals the target's. Per prompt (all its sampled continuations pooled)::

    coverage_p = covered rows of p / rows of p             (rows: positions of its outputs)
    miss_p     = 1 - coverage_p
    weight_p   = floor + (1 - floor) * miss_p / mean_q(miss_q)

so weights average 1, rank prompts by how badly the collective does on them, and keep every
prompt at least ``floor`` (floor 0 is SpecInfer's pure filter made soft: fully covered prompts
drop out). With no misses anywhere the weights stay uniform.
"""

from __future__ import annotations

import torch


def prompt_coverage(
    ranks_by_draft: list[list[torch.Tensor]],  # [num_drafts][num_seqs] -> [rows] int64 ranks
    prompt_index: tuple[int, ...] | list[int],  # [num_seqs] the prompt each sequence continues
    num_prompts: int,
) -> list[float]:
    """Fraction of each prompt's rows where at least one draft's top-1 is the target's (rank 0);
    None for a prompt without rows (not trained on)."""
    covered = [0] * num_prompts
    rows = [0] * num_prompts
    for seq, prompt in enumerate(prompt_index):
        hit = torch.zeros_like(ranks_by_draft[0][seq], dtype=torch.bool)
        for ranks in ranks_by_draft:
            hit |= ranks[seq] == 0
        covered[prompt] += int(hit.sum())
        rows[prompt] += hit.numel()
    return [c / r if r else None for c, r in zip(covered, rows)]


def boost_weights(coverage: list[float | None], floor: float) -> list[float]:
    """Sampling weight per prompt for the next draft (see the module docstring); prompts
    without rows (coverage None) get 1.0 and do not enter the mean."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], not {floor}")
    misses = [1.0 - c for c in coverage if c is not None]
    mean_miss = sum(misses) / len(misses) if misses else 0.0
    if mean_miss <= 0.0:
        return [1.0] * len(coverage)
    return [1.0 if c is None else floor + (1.0 - floor) * (1.0 - c) / mean_miss for c in coverage]
