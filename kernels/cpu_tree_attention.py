"""Tree attention for the CPU: the same function as ``tree_attention_ref``, batched.

The reference loops over sequences in every layer and rebuilds each tree's mask each time.
Here the host work is done once per forward step in a ``DenseAttentionPlan`` (gather indices,
masks, padding), and every layer runs one padded ``scaled_dot_product_attention`` per group of
sequences. Sequences are grouped by tree length so one long prefill chunk does not pad the
decode trees of everyone else to its length::

    group g: q_rows [n_g]      rows of q in this group
             pad_rows [n_g]    where those rows sit in the padded [num_seqs_g * max_tree_g] layout
             kv_slots [num_seqs_g, max_total_g]  slot of each attended position (0 for padding)
             mask [num_seqs_g, 1, max_tree_g, max_total_g] bool
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specserve_kernels.reference import tree_ancestor_mask

LONG_TREE = 16  # trees longer than this (prefill chunks) get a group of their own


@dataclass(frozen=True)
class DenseGroup:
    q_rows: torch.Tensor  # [n_g] int64, rows of q
    pad_rows: torch.Tensor  # [n_g] int64, their rows in the padded layout
    kv_slots: torch.Tensor  # [num_seqs_g, max_total_g] int64
    mask: torch.Tensor  # [num_seqs_g, 1, max_tree_g, max_total_g] bool


@dataclass(frozen=True)
class DenseAttentionPlan:
    groups: tuple[DenseGroup, ...]


def build_dense_plan(
    block_tables: list[list[int]],
    prefix_lens: list[int],
    tree_parents: list[list[int]],
    block_size: int,
    device: torch.device,
) -> DenseAttentionPlan:
    """Host-side plan for one step. tree_parents[s] is sequence s's parent list (topological)."""
    starts, row = [], 0
    for parents in tree_parents:
        starts.append(row)
        row += len(parents)
    short = [s for s, p in enumerate(tree_parents) if 0 < len(p) <= LONG_TREE]
    long = [[s] for s, p in enumerate(tree_parents) if len(p) > LONG_TREE]
    groups = []
    for members in ([short] if short else []) + long:
        max_tree = max(len(tree_parents[s]) for s in members)
        max_total = max(prefix_lens[s] + len(tree_parents[s]) for s in members)
        q_rows = torch.full((len(members), max_tree), -1, dtype=torch.int64)
        kv_slots = torch.zeros(len(members), max_total, dtype=torch.int64)
        mask = torch.zeros(len(members), 1, max_tree, max_total, dtype=torch.bool)
        for g, s in enumerate(members):
            tree_len, prefix = len(tree_parents[s]), prefix_lens[s]
            total = prefix + tree_len
            positions = torch.arange(total)
            table = torch.tensor(block_tables[s], dtype=torch.int64)
            kv_slots[g, :total] = table[positions // block_size] * block_size + positions % block_size
            q_rows[g, :tree_len] = torch.arange(starts[s], starts[s] + tree_len)
            mask[g, 0, :tree_len, :prefix] = True
            mask[g, 0, :tree_len, prefix:total] = tree_ancestor_mask(torch.tensor(tree_parents[s]))
            mask[g, 0, tree_len:, 0] = True  # padding rows attend somewhere: no NaN
        q_rows = q_rows.flatten()
        pad_rows = torch.nonzero(q_rows >= 0).flatten()
        groups.append(DenseGroup(q_rows[pad_rows].to(device), pad_rows.to(device), kv_slots.to(device),
                                 mask.to(device)))
    return DenseAttentionPlan(tuple(groups))


def dense_tree_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    plan: DenseAttentionPlan,
    scale: float,
) -> torch.Tensor:
    """[num_tokens, num_heads, head_dim]: equal to tree_attention_ref on the plan's inputs."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    out = torch.empty_like(q)
    for group in plan.groups:
        num_seqs, max_total = group.kv_slots.shape
        max_tree = group.mask.shape[2]
        q_pad = q.new_zeros(num_seqs * max_tree, num_heads, head_dim)
        q_pad.index_copy_(0, group.pad_rows, q.index_select(0, group.q_rows))
        keys = k_flat[group.kv_slots].transpose(1, 2)  # [num_seqs, num_kv_heads, max_total, head_dim]
        values = v_flat[group.kv_slots].transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            q_pad.view(num_seqs, max_tree, num_heads, head_dim).transpose(1, 2),
            keys, values, attn_mask=group.mask, scale=scale, enable_gqa=num_kv_heads != num_heads,
        )  # [num_seqs, num_heads, max_tree, head_dim]
        flat = attended.transpose(1, 2).reshape(-1, num_heads, head_dim)
        out.index_copy_(0, group.q_rows, flat.index_select(0, group.pad_rows))
    return out
