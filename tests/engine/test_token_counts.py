"""Counts for the penalties: a tree node's row counts the tokens on its own path."""

import torch

from specserve.engine.token_counts import TokenCounts, path_token_counts
from specserve.tree import TokenTree

#   0:9 ─┬─ 1:1 ─┬─ 2:2 ─┬─ 3:3
#        │       │       └─ 6:6
#        │       └─ 4:4
#        └─ 5:5
TREE = TokenTree.from_paths(9, [[1, 2, 3], [1, 4], [5], [1, 2, 6]])


def _rows(counts: torch.Tensor) -> list[dict[int, int]]:
    return [{int(t): int(c) for t, c in enumerate(row) if c} for row in counts]


def test_path_counts_follow_each_nodes_path_without_the_root():
    counts = path_token_counts(TREE.parents, torch.tensor(TREE.token_ids), 10)
    assert counts.shape == (7, 10)
    assert _rows(counts) == [{}, {1: 1}, {1: 1, 2: 1}, {1: 1, 2: 1, 3: 1}, {1: 1, 4: 1}, {5: 1}, {1: 1, 2: 1, 6: 1}]


def test_path_counts_count_repeats_and_take_a_batch_of_trees():
    chain = TokenTree.chain([4, 1, 1, 4])
    tokens = torch.tensor([chain.token_ids, (0, 2, 0, 2)])
    counts = path_token_counts(chain.parents, tokens, 5)
    assert counts.shape == (2, 4, 5)
    assert _rows(counts[0]) == [{}, {1: 1}, {1: 2}, {1: 2, 4: 1}]  # the root's own 4 not counted
    assert _rows(counts[1]) == [{}, {2: 1}, {0: 1, 2: 1}, {0: 1, 2: 2}]


def test_token_counts_add_committed_tokens_and_extend_along_a_tree():
    counts = TokenCounts.from_tokens([7, 8, 7], [1, 9], 10, torch.device("cpu"))
    assert counts.prompt_mask.nonzero().flatten().tolist() == [7, 8]
    assert _rows(counts.output_counts[None]) == [{1: 1, 9: 1}]
    counts.add([1, 1])
    assert _rows(counts.output_counts[None]) == [{1: 3, 9: 1}]
    rows = counts.along_tree(TREE)
    assert rows.shape == (7, 10)
    assert _rows(rows)[0] == {1: 3, 9: 1} and _rows(rows)[4] == {1: 4, 4: 1, 9: 1}
    assert _rows(counts.along_tree(TokenTree((9,), (-1,)))) == [{1: 3, 9: 1}]
