"""How well a draft predicts the target, from teacher forcing and from the engine itself.

Teacher forcing gives, at every row of a target continuation, the rank of the target's argmax
token in the draft's distribution (0: the draft's top-1 agrees). Along a GREEDY continuation
this is exact about speculation: a draft node on the target's path sees exactly the target's
prefix, so

- a chain of depth d accepts, from output token j on, the run of rank-0 rows j, j+1, ...
  (at most d, and never past the end), then the target's bonus token: a step commits k + 1;
- a full static tree with widths (w_1, .., w_D) accepts depth t iff rank < w_t there.

The first output token comes from prefill, so steps start at output token 1, as in the engine.

A feature draft (``feature_draft``) reads its parent's predicted state, so its rank depends on
the node's depth: its ranks come per depth (``feature_passes``, pass d for depth d), and a
node at depth d on the target's path is judged by depth d's rank, which keeps the simulation
exact for it too. A token-level draft's rank is the same at every depth.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from draft_models.dense_forward import causal_hidden, feature_passes, pad_batch, pad_states
from draft_models.distill_data import TeacherSet, length_batches
from draft_models.feature_draft import FeatureDraft
from specserve.models.llama import LlamaForCausalLM

CHAIN_DEPTHS = (1, 2, 4, 6, 8)
TREE_WIDTHS = (4, 2, 1, 1, 1, 1, 1, 1)  # a full static tree of 60 draft nodes, depth 8


@torch.inference_mode()
def draft_ranks(
    draft: LlamaForCausalLM, teacher: TeacherSet, batch_tokens: int, num_depths: int = len(TREE_WIDTHS)
) -> list[torch.Tensor]:
    """Per sequence the rank of the target's top-1 in the draft's logits (CPU, int64): [rows]
    for a token-level draft; [num_depths, rows] for a feature draft (row d: a node at depth
    d + 1; needs ``teacher.states``)."""
    device = draft.embed_tokens.weight.device
    embed_dtype = draft.embed_tokens.weight.dtype
    mixed = embed_dtype != torch.float32
    autocast = torch.autocast(device.type, dtype=embed_dtype) if mixed else contextlib.nullcontext()
    feature = isinstance(draft, FeatureDraft)
    if feature and teacher.states is None:
        raise ValueError("a feature draft's ranks need the target's states (teacher_force keep_states)")
    ranks: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)] * teacher.num_seqs
    for group in length_batches([len(x) for x in teacher.input_ids], batch_tokens):
        input_ids = pad_batch([teacher.input_ids[s] for s in group], device)
        with autocast:
            if feature:
                passes = feature_passes(draft, input_ids, pad_states([teacher.states[s] for s in group]), num_depths)
            else:
                passes = [causal_hidden(draft, input_ids)]
        for row, s in enumerate(group):
            start, top1 = teacher.loss_starts[s], teacher.top1[teacher.cu_rows[s] : teacher.cu_rows[s + 1]]
            per_depth = []
            for hidden in passes:
                with autocast:
                    logits = draft.compute_logits(hidden[row, start : start + teacher.rows_of(s)])
                per_depth.append((logits > logits.gather(1, top1[:, None])).sum(-1).cpu())
            ranks[s] = torch.stack(per_depth) if feature else per_depth[0]
    return ranks


Ranks = list[int] | list[list[int]]  # one sequence: per row, or per depth then per row


def _by_depth(ranks: Ranks) -> list[list[int]]:
    return ranks if ranks and isinstance(ranks[0], list) else [ranks]


def accepted_run(ranks: Ranks, start: int, widths: tuple[int, ...]) -> int:
    """Drafts accepted in one step beginning at output token ``start`` (widths[t]: depth t+1's
    width; per-depth ranks: depth t+1 reads ranks[t], the deepest given beyond)."""
    depths = _by_depth(ranks)
    limit = min(len(widths), len(depths[0]) - start - 1)  # the last token is always the bonus
    accepted = 0
    while accepted < limit and depths[min(accepted, len(depths) - 1)][start + accepted] < widths[accepted]:
        accepted += 1
    return accepted


def simulated_steps(ranks: Ranks, widths: tuple[int, ...]) -> int:
    """Target steps to produce output tokens 1 .. num_rows - 1 with this tree."""
    num_rows = len(_by_depth(ranks)[0])
    position, steps = 1, 0
    while position < num_rows:
        position += accepted_run(ranks, position, widths) + 1
        steps += 1
    return steps


def mean_accepted_length(rank_seqs: list[Ranks], widths: tuple[int, ...]) -> float:
    """Tokens committed per target step over all sequences (the engine's mean accepted length)."""
    lengths = [len(_by_depth(r)[0]) for r in rank_seqs]
    tokens = sum(n - 1 for n in lengths if n > 1)
    steps = sum(simulated_steps(r, widths) for r, n in zip(rank_seqs, lengths) if n > 1)
    return tokens / steps if steps else 0.0


def heldout_metrics(ranks: list[torch.Tensor]) -> dict[str, Any]:
    """Agreement and simulated acceptance from ``draft_ranks`` (top-k agreement: depth 1)."""
    per_depth = bool(ranks) and ranks[0].dim() == 2
    flat = torch.cat([r[0] if per_depth else r for r in ranks]) if ranks else torch.empty(0, dtype=torch.int64)
    seqs = [r.tolist() for r in ranks]
    extra = {}
    if per_depth:
        by_depth = torch.cat(ranks, dim=1)
        extra["top1_agreement_by_depth"] = [round(float(d.eq(0).float().mean()), 4) for d in by_depth]
    return {**extra,
        "num_sequences": len(ranks),
        "num_rows": int(flat.numel()),
        "top1_agreement": round(float(flat.eq(0).float().mean()), 4) if flat.numel() else 0.0,
        "top4_agreement": round(float(flat.lt(4).float().mean()), 4) if flat.numel() else 0.0,
        "chain_mean_accepted_length": {
            str(d): round(mean_accepted_length(seqs, (1,) * d), 3) for d in CHAIN_DEPTHS
        },
        "static_tree": {
            "widths": list(TREE_WIDTHS),
            "num_draft_nodes": sum_tree_nodes(TREE_WIDTHS),
            "mean_accepted_length": round(mean_accepted_length(seqs, TREE_WIDTHS), 3),
        },
    }


def sum_tree_nodes(widths: tuple[int, ...]) -> int:
    total, level = 0, 1
    for w in widths:
        level *= w
        total += level
    return total


def engine_acceptance(
    target,
    draft_folder,
    prompt_ids: list[tuple[int, ...]],
    greedy_outputs: list[tuple[int, ...]],
    max_new_tokens: int,
    speculative,
    max_num_seqs: int,
) -> dict[str, Any]:
    """The engine's own mean accepted length with the saved draft, greedy, on the held-out
    prompts (SpeculativeConfig(method="draft", ...)), and how many outputs equal plain greedy's.
    The per-request switch-off (and with it the batch gate) is off, as in bench.acceptance: the
    figure is the drafter's own, not hidden by steps the engine chose not to draft."""
    import dataclasses
    import time

    from specserve.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
    from specserve.engine.llm_engine import LLMEngine

    if not prompt_ids:
        return {"status": "not measured: no held-out prompts"}
    spec = dataclasses.replace(speculative, method="draft", draft_model=str(draft_folder), merge=(),
                               switch_off=False)
    blocks = max_num_seqs * (-(-(max(map(len, prompt_ids)) + max_new_tokens + spec.max_tree_tokens) // 16) + 2)
    engine = LLMEngine(
        EngineConfig(cache=CacheConfig(num_blocks=blocks), scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
                     speculative=spec),
        loaded=target,
    )
    start = time.perf_counter()
    outs = engine.generate([list(p) for p in prompt_ids], SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
    steps = sum(o.num_steps for o in outs)
    accepted = sum(o.num_accepted_tokens for o in outs)
    fields = ("tree", "max_tree_tokens", "max_depth", "widths", "top_k")
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items() if k in fields}
    return {
        "status": "measured",
        "speculative_config": config,
        "num_prompts": len(outs),
        "mean_accepted_length": round(1 + accepted / steps, 3) if steps else 0.0,
        "per_request_mean_accepted_length": round(sum(o.mean_accepted_length for o in outs) / len(outs), 3),
        "identical_to_greedy": sum(list(o.token_ids) == list(g) for o, g in zip(outs, greedy_outputs)),
        "wall_s": round(time.perf_counter() - start, 2),
    }
