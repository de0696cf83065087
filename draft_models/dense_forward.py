"""A differentiable causal forward of our Llama over padded batches, for distillation.

The serving forward (``LlamaForCausalLM.forward``) writes a paged KV cache in place and its
Triton kernel has no backward; training needs neither. ``causal_hidden`` runs the same modules
(same parameters, same RoPE table) with PyTorch SDPA under a causal mask instead, and equals the
serving forward up to float rounding (tests/draft_models/test_dense_forward.py).

``feature_passes`` does the same for a feature draft (``feature_draft``), unrolled over
several draft depths.

Rows are right-padded: row b's real tokens sit at columns 0 .. len_b - 1 with positions
0 .. len_b - 1, so the causal mask alone keeps padding out of every real token's view.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from specserve.models.config import LlamaArchConfig
from specserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from specserve.models.rope import apply_rope

if TYPE_CHECKING:
    from draft_models.feature_draft import FeatureDraft


def causal_hidden(model: LlamaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [batch, seq_len] int64 -> hidden after the final norm [batch, seq_len, hidden_size]."""
    hidden = model.embed_tokens(input_ids)  # [batch, seq_len, hidden_size]
    cos_sin = model.cos_sin[: input_ids.shape[1]]  # [seq_len, head_dim]
    for layer in model.layers:
        hidden = _layer(layer, model.cfg, hidden, cos_sin, [], None)
    return model.norm(hidden)


def _layer(
    layer: LlamaDecoderLayer,
    cfg: LlamaArchConfig,
    hidden: torch.Tensor,  # [batch, seq_len, hidden_size]
    cos_sin: torch.Tensor,  # [seq_len, head_dim]
    earlier_kv: list[tuple[torch.Tensor, torch.Tensor]],  # (output) this layer's K/V of earlier passes
    mask: torch.Tensor | None,  # [seq_len, (passes so far + 1) * seq_len] bool; None: causal
) -> torch.Tensor:
    """One decoder layer; its K/V [batch, num_kv_heads, seq_len, head_dim] are appended to
    ``earlier_kv`` and the queries attend over all of them under ``mask``."""
    batch, seq_len, _ = hidden.shape
    attn = layer.self_attn
    qkv = attn.qkv_proj(layer.input_layernorm(hidden))
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = apply_rope(q.view(batch, seq_len, cfg.num_heads, cfg.head_dim), cos_sin)
    k = apply_rope(k.view(batch, seq_len, cfg.num_kv_heads, cfg.head_dim), cos_sin)
    v = v.view(batch, seq_len, cfg.num_kv_heads, cfg.head_dim)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [batch, heads, seq_len, head_dim]
    earlier_kv.append((k, v))
    group = cfg.num_heads // cfg.num_kv_heads
    keys = torch.cat([kv[0] for kv in earlier_kv], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([kv[1] for kv in earlier_kv], dim=2).repeat_interleave(group, dim=1)
    if mask is None:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=attn.scale)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scale)
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, seq_len, cfg.q_size))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def pass_mask(num_pass: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[seq_len, num_pass * seq_len] bool: what the query at position p of pass k (1-based) sees.

    Pass k at position p stands for the depth-(k - 1) draft node at position p of a tree whose
    root sits at r = p - k + 1. It sees pass 1's keys (states computed from the target's real
    states) at positions <= r, and the key of its ancestor at depth j - 1, pass j's key at
    position p - (k - j), for j = 2 .. k (j = k: itself).
    """
    p = torch.arange(seq_len, device=device)[:, None]
    q = torch.arange(seq_len, device=device)[None, :]
    blocks = [q <= p - num_pass + 1] + [q == p - (num_pass - j) for j in range(2, num_pass + 1)]
    return torch.cat(blocks, dim=1)


def feature_passes(
    draft: FeatureDraft,
    input_ids: torch.Tensor,  # [batch, seq_len] int64
    target_states: torch.Tensor,  # [batch, seq_len, hidden_size]: the target's h_p at position p
    num_passes: int,
) -> list[torch.Tensor]:
    """The draft's predicted states of ``num_passes`` unrolled depths, each [batch, seq_len, hidden].

    Pass 1 reads the target's real states (h_{p-1} at position p): the tree's root. Pass k
    reads pass k - 1's prediction at p - 1 and attends as ``pass_mask`` says, which is exactly
    what a chain of drafts along the sequence computes in the engine (tests check this
    against ``FeatureDraft.forward`` over a paged cache). Rows with p < k - 1 have no root and
    are meaningless.
    """
    batch, seq_len, hidden_size = target_states.shape
    cos_sin = draft.cos_sin[:seq_len]
    zero = target_states.new_zeros(batch, 1, hidden_size)
    reads = torch.cat([zero, target_states[:, :-1]], dim=1)
    kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in draft.layers]
    outs = []
    for k in range(1, num_passes + 1):
        mask = None if k == 1 else pass_mask(k, seq_len, input_ids.device)
        hidden = draft.input_hidden(input_ids, reads)
        for layer, layer_kv in zip(draft.layers, kv):
            hidden = _layer(layer, draft.cfg, hidden, cos_sin, layer_kv, mask)
        states = draft.norm(hidden)
        outs.append(states)
        reads = torch.cat([zero.to(states.dtype), states[:, :-1]], dim=1)
    return outs


def pad_states(states: list[torch.Tensor]) -> torch.Tensor:
    """[len_b, hidden] tensors (one device) -> [len(states), longest, hidden] right-padded with 0."""
    out = states[0].new_zeros(len(states), max(len(x) for x in states), states[0].shape[1])
    for row, x in enumerate(states):
        out[row, : len(x)] = x
    return out


def pad_batch(sequences: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1-D int64 token tensors -> [len(sequences), longest] right-padded with 0 on ``device``."""
    width = max(len(s) for s in sequences)
    batch = torch.zeros(len(sequences), width, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        batch[row, : len(seq)] = seq
    return batch.to(device, non_blocking=True)
