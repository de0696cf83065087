"""Plain PyTorch references for the kernels in this folder.

Layout of the paged KV cache that every function here reads::

    k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables      [num_seqs, max_num_blocks]   logical block j of sequence s -> physical block
    logical position p of sequence s lives at k_cache[block_tables[s, p // block_size], p % block_size]

A forward step hands attention a *token tree* per sequence: ``prefix_lens[s]`` committed tokens
whose K/V are already cached, followed by ``tree_lens[s]`` new tokens whose K/V were written at
logical positions ``prefix_lens[s] + i`` just before the call. A chain (parent of i is i - 1) is
ordinary causal attention, so decode (tree of one token) and chunked prefill are special cases.
"""

from __future__ import annotations

import math

import torch


def tree_ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """Ancestor-or-self mask of one tree.

    parents  [tree_len] int, parents[i] < i, -1 for a root
    returns  [tree_len, tree_len] bool, mask[i, j] is True iff j == i or j is an ancestor of i
    """
    tree_len = parents.shape[0]
    parents = parents.to(torch.long).cpu()
    if torch.equal(parents, torch.arange(-1, tree_len - 1)):  # a chain: plain causal attention
        return torch.ones(tree_len, tree_len, dtype=torch.bool).tril()
    parents = parents.tolist()
    mask = torch.zeros(tree_len, tree_len, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= i:
            raise ValueError(f"tree_parents must be topological: parent {parent} of token {i}")
        if parent >= 0:
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask


def gather_sequence_kv(
    cache: torch.Tensor, block_table: torch.Tensor, num_positions: int
) -> torch.Tensor:
    """The first ``num_positions`` logical positions of one sequence, contiguous.

    cache        [num_blocks, block_size, num_kv_heads, head_dim]
    block_table  [max_num_blocks] int
    returns      [num_positions, num_kv_heads, head_dim]
    """
    block_size = cache.shape[1]
    positions = torch.arange(num_positions, device=cache.device)
    blocks = block_table.to(cache.device, torch.long)[positions // block_size]
    return cache[blocks, positions % block_size]


def tree_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    tree_lens: torch.Tensor,
    tree_parents: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of every tree token over its sequence's prefix and its own ancestors.

    q             [num_tokens, num_heads, head_dim]   sequences concatenated, each in topological order
    k_cache       [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache       [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables  [num_seqs, max_num_blocks] int32
    prefix_lens   [num_seqs] int32
    tree_lens     [num_seqs] int32, sum(tree_lens) == num_tokens
    tree_parents  [num_tokens] int32, index within the same sequence's tree, -1 for a root
    returns       [num_tokens, num_heads, head_dim] in q's dtype

    Computed in float32 per sequence with an explicit boolean mask.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    prefix_list = prefix_lens.tolist()
    tree_list = tree_lens.tolist()
    if sum(tree_list) != num_tokens:
        raise ValueError(f"sum(tree_lens) = {sum(tree_list)} but q has {num_tokens} tokens")
    out = torch.empty_like(q)
    start = 0
    for seq, (prefix_len, tree_len) in enumerate(zip(prefix_list, tree_list)):
        if tree_len == 0:
            continue
        end = start + tree_len
        total = prefix_len + tree_len
        keys = gather_sequence_kv(k_cache, block_tables[seq], total).float()
        values = gather_sequence_kv(v_cache, block_tables[seq], total).float()
        keys = keys.repeat_interleave(group, dim=1)  # [total, num_heads, head_dim]
        values = values.repeat_interleave(group, dim=1)
        mask = torch.ones(tree_len, total, dtype=torch.bool)
        mask[:, prefix_len:] = tree_ancestor_mask(tree_parents[start:end])
        mask = mask.to(q.device)
        scores = torch.einsum("thd,khd->htk", q[start:end].float(), keys) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("htk,khd->thd", probs, values).to(q.dtype)
        start = end
    return out


def dense_tree_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """The naive definition the reference must equal: softmax(q k^T * scale + mask) v.

    q     [num_q, num_heads, head_dim]; k, v [num_k, num_heads, head_dim]; mask [num_q, num_k] bool
    """
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v.double())
