"""The batched CPU tree attention equals the reference on random trees, prefixes and tables."""

import random

import pytest
import torch

from specserve_kernels.cpu_tree_attention import build_dense_plan, dense_tree_attention
from specserve_kernels.reference import tree_attention_ref


def random_parents(rng: random.Random, tree_len: int, shape: str) -> list[int]:
    if shape == "chain":
        return list(range(-1, tree_len - 1))
    if shape == "star":
        return [-1] + [0] * (tree_len - 1)
    return [-1] + [rng.randrange(i) for i in range(1, tree_len)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("group", [1, 3])
def test_dense_equals_reference(seed, group):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    block_size, num_kv_heads, head_dim = 4, 2, 8
    num_heads = num_kv_heads * group
    num_seqs = rng.randint(1, 5)
    tree_lens = [rng.choice([1, 1, 3, 9, 17, 30]) for _ in range(num_seqs)]
    prefix_lens = [rng.choice([0, 1, 5, 16, 23]) for _ in range(num_seqs)]
    parents = [random_parents(rng, t, rng.choice(["chain", "star", "random"])) for t in tree_lens]
    blocks_needed = [-(-(p + t) // block_size) for p, t in zip(prefix_lens, tree_lens)]
    num_blocks = sum(blocks_needed) + 3
    physical = list(range(num_blocks))
    rng.shuffle(physical)
    tables, cursor = [], 0
    for n in blocks_needed:
        tables.append(physical[cursor : cursor + n])
        cursor += n
    width = max(len(t) for t in tables)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim)
    q = torch.randn(sum(tree_lens), num_heads, head_dim)
    scale = head_dim**-0.5
    expected = tree_attention_ref(
        q, k_cache, v_cache, torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        torch.tensor(prefix_lens, dtype=torch.int32), torch.tensor(tree_lens, dtype=torch.int32),
        torch.tensor([p for ps in parents for p in ps], dtype=torch.int32), scale,
    )
    plan = build_dense_plan(tables, prefix_lens, parents, block_size, torch.device("cpu"))
    got = dense_tree_attention(q, k_cache, v_cache, plan, scale)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
