"""A differentiable causal forward of our Llama over padded batches, for distillation.

The serving forward (``LlamaForCausalLM.forward``) writes a paged KV cache in place and its
Triton kernel has no backward; training needs neither. ``causal_hidden`` runs the same modules
(same parameters, same RoPE table) with PyTorch SDPA under a causal mask instead, and equals the
serving forward up to float rounding (tests/draft_models/test_dense_forward.py).

Rows are right-padded: row b's real tokens sit at columns 0 .. len_b - 1 with positions
0 .. len_b - 1, so the causal mask alone keeps padding out of every real token's view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specserve.models.llama import LlamaForCausalLM
from specserve.models.rope import apply_rope


def causal_hidden(model: LlamaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [batch, seq_len] int64 -> hidden after the final norm [batch, seq_len, hidden_size]."""
    cfg = model.cfg
    batch, seq_len = input_ids.shape
    cos_sin = model.cos_sin[:seq_len]  # [seq_len, head_dim]
    group = cfg.num_heads // cfg.num_kv_heads
    hidden = model.embed_tokens(input_ids)  # [batch, seq_len, hidden_size]
    for layer in model.layers:
        attn = layer.self_attn
        qkv = attn.qkv_proj(layer.input_layernorm(hidden))
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = apply_rope(q.view(batch, seq_len, cfg.num_heads, cfg.head_dim), cos_sin)
        k = apply_rope(k.view(batch, seq_len, cfg.num_kv_heads, cfg.head_dim), cos_sin)
        v = v.view(batch, seq_len, cfg.num_kv_heads, cfg.head_dim)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [batch, heads, seq_len, head_dim]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, seq_len, cfg.q_size))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.norm(hidden)


def pad_batch(sequences: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1-D int64 token tensors -> [len(sequences), longest] right-padded with 0 on ``device``."""
    width = max(len(s) for s in sequences)
    batch = torch.zeros(len(sequences), width, dtype=torch.int64)
    for row, seq in enumerate(sequences):
        batch[row, : len(seq)] = seq
    return batch.to(device, non_blocking=True)
