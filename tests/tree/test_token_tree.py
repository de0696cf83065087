import pytest
import torch

from specserve.tree import TokenTree

# root 9; paths share the prefixes [1] and [1, 2]:
#
#   0:9 ─┬─ 1:1 ─┬─ 2:2 ─┬─ 3:3
#        │       │       └─ 6:6
#        │       └─ 4:4
#        └─ 5:5
PATHS = [[1, 2, 3], [1, 4], [5], [1, 2, 6]]


def test_chain() -> None:
    tree = TokenTree.chain([4, 5, 6])
    assert tree.token_ids == (4, 5, 6)
    assert tree.parents == (-1, 0, 1)
    assert tree.num_nodes == 3
    assert tree.is_chain
    assert tree.depths() == [0, 1, 2]
    assert tree.positions(prefix_len=10) == [10, 11, 12]
    assert tree.children() == [[1], [2], []]
    assert tree.leaves() == [2]
    assert tree.paths() == [[0, 1, 2]]
    assert torch.equal(tree.mask(), torch.tril(torch.ones(3, 3, dtype=torch.bool)))


def test_root_alone_is_a_decode_step() -> None:
    tree = TokenTree.from_paths(7, [])
    assert tree == TokenTree.chain([7])
    assert tree.token_ids == (7,)
    assert tree.parents == (-1,)
    assert tree.is_chain
    assert tree.leaves() == [0]
    assert tree.paths() == [[0]]
    assert torch.equal(tree.mask(), torch.tensor([[True]]))


def test_from_paths_shares_prefixes() -> None:
    tree = TokenTree.from_paths(9, PATHS)
    assert tree.token_ids == (9, 1, 2, 3, 4, 5, 6)
    assert tree.parents == (-1, 0, 1, 2, 1, 0, 2)
    assert not tree.is_chain
    assert tree.depths() == [0, 1, 2, 3, 2, 1, 3]
    assert tree.positions(prefix_len=10) == [10, 11, 12, 13, 12, 11, 13]
    assert tree.children() == [[1, 5], [2, 4], [3, 6], [], [], [], []]
    assert tree.leaves() == [3, 4, 5, 6]
    assert tree.path_to(6) == [0, 1, 2, 6]
    assert tree.paths() == [[0, 1, 2, 3], [0, 1, 4], [0, 5], [0, 1, 2, 6]]
    assert tree.token_paths() == [(), (1,), (1, 2), (1, 2, 3), (1, 4), (5,), (1, 2, 6)]


def test_from_paths_ignores_repeated_paths() -> None:
    assert TokenTree.from_paths(9, PATHS + [[1, 2], [5]]) == TokenTree.from_paths(9, PATHS)


def test_mask_is_ancestors_and_self() -> None:
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 0, 0, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(TokenTree.from_paths(9, PATHS).mask(), expected)


def test_draft_probs_do_not_take_part_in_equality() -> None:
    tree = TokenTree((9, 1), (-1, 0))
    assert TokenTree((9, 1), (-1, 0), draft_probs=torch.zeros(2, 4)) == tree


@pytest.mark.parametrize(
    ("token_ids", "parents"),
    [
        ((), ()),  # no root
        ((9, 1), (-1,)),  # one parent short
        ((9, 1), (0, 0)),  # node 0 is not the root
        ((9, 1, 2), (-1, 2, 0)),  # parent after its child
        ((9, 1), (-1, 1)),  # its own parent
        ((9, 1), (-1, -1)),  # a second root
    ],
)
def test_invalid_trees_raise(token_ids: tuple[int, ...], parents: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        TokenTree(token_ids, parents)


def test_draft_probs_need_one_row_per_node() -> None:
    with pytest.raises(ValueError):
        TokenTree((9, 1, 2), (-1, 0, 0), draft_probs=torch.zeros(2, 4))
