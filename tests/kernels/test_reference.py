"""``tree_attention_ref`` against the naive definition, built independently of it."""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from specserve_kernels.reference import dense_tree_attention, tree_attention_ref  # noqa: E402


def random_parents(num_tokens: int, generator: torch.Generator) -> list[int]:
    """A random rooted tree in topological order: parent of i is uniform in [0, i)."""
    return [
        -1 if i == 0 else int(torch.randint(0, i, (1,), generator=generator))
        for i in range(num_tokens)
    ]


def ancestors_or_self(parents: list[int], token: int) -> set[int]:
    path = set()
    while token >= 0:
        path.add(token)
        token = parents[token]
    return path


def naive_tree_attention(q, k_cache, v_cache, block_tables, prefix_lens, parents_per_seq, scale):
    """Position by position through the block table, every head separately, in float64."""
    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    outputs = []
    start = 0
    for seq, parents in enumerate(parents_per_seq):
        tree_len = len(parents)
        total = prefix_lens[seq] + tree_len
        rows = []
        for position in range(total):
            block = int(block_tables[seq, position // block_size])
            rows.append(
                (k_cache[block, position % block_size], v_cache[block, position % block_size])
            )
        keys = torch.stack([key for key, _ in rows])  # [total, num_kv_heads, head_dim]
        values = torch.stack([value for _, value in rows])
        head_to_kv = torch.tensor([head // group for head in range(num_heads)])
        mask = torch.zeros(tree_len, total, dtype=torch.bool)
        for token in range(tree_len):
            mask[token, : prefix_lens[seq]] = True
            for ancestor in ancestors_or_self(parents, token):
                mask[token, prefix_lens[seq] + ancestor] = True
        outputs.append(
            dense_tree_attention(
                q[start : start + tree_len], keys[:, head_to_kv], values[:, head_to_kv], mask, scale
            )
        )
        start += tree_len
    return torch.cat(outputs)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 2)])
def test_reference_matches_dense_definition(seed, num_heads, num_kv_heads):
    generator = torch.Generator().manual_seed(seed)
    head_dim, block_size = 16, 8
    tree_lens = [7, 1, 12, 0, 5]
    prefix_lens = [0, 9, 3, 4, 20]
    parents_per_seq = [random_parents(n, generator) for n in tree_lens]
    parents_per_seq[1] = [-1]
    parents_per_seq[4] = [-1, 0, 1, 2, 3]  # a chain is causal attention
    blocks_per_seq = [math.ceil((p + t) / block_size) for p, t in zip(prefix_lens, tree_lens)]
    num_blocks = sum(blocks_per_seq) + 2
    physical = torch.randperm(num_blocks, generator=generator).int()
    block_tables = torch.zeros(len(tree_lens), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = physical[used : used + count]
        used += count
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
    q = torch.randn(sum(tree_lens), num_heads, head_dim, generator=generator)
    tree_parents = torch.tensor(
        [p for parents in parents_per_seq for p in parents], dtype=torch.int32
    )
    scale = 0.3

    out = tree_attention_ref(
        q,
        k_cache,
        v_cache,
        block_tables,
        torch.tensor(prefix_lens, dtype=torch.int32),
        torch.tensor(tree_lens, dtype=torch.int32),
        tree_parents,
        scale,
    )
    expected = naive_tree_attention(
        q, k_cache, v_cache, block_tables, prefix_lens, parents_per_seq, scale
    )
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
