import random

import pytest

from specserve.tree import TokenTree
from specserve.tree.builders import (
    ChainTreeBuilder,
    DynamicTreeBuilder,
    StaticTreeBuilder,
    best_num_nodes,
    merge_trees,
    tree_from_paths_within_budget,
)


def fake_candidates(builder, table):
    """Candidates of every frontier node, looked up by the node's token in ``table``."""
    out = []
    for s, nodes in enumerate(builder.frontier()):
        out.append([table[builder.growing[s].token_ids[n]] for n in nodes])
    return out


TABLE = {
    # token -> candidates (token, prob), best first
    1: [(10, 0.6), (11, 0.3), (12, 0.1)],
    10: [(20, 0.9), (21, 0.05)],
    11: [(22, 0.5), (23, 0.4)],
    12: [(24, 1.0)],
    20: [(30, 0.5)], 21: [(31, 0.5)], 22: [(32, 0.5)], 23: [(33, 0.5)], 24: [(34, 0.5)],
}


def test_static_builder_expands_widths_per_depth():
    builder = StaticTreeBuilder([1], widths=(2, 1, 1), max_nodes=[16], max_depths=[3])
    while any(builder.frontier()):
        builder.extend(fake_candidates(builder, TABLE))
    (tree,) = builder.trees()
    assert tree == TokenTree((1, 10, 11, 20, 22, 30, 32), (-1, 0, 0, 1, 2, 3, 4))
    assert builder.path_probs()[0] == pytest.approx([0.6, 0.54, 0.3, 0.27, 0.15, 0.075])
    # the 3 most probable nodes: 10, 20, 11
    assert builder.trees([3])[0] == TokenTree((1, 10, 11, 20), (-1, 0, 0, 1))


def test_static_builder_respects_budget_and_depth():
    builder = StaticTreeBuilder([1, 1], widths=(3, 2, 1), max_nodes=[4, 16], max_depths=[3, 1])
    levels = 0
    while any(builder.frontier()):
        builder.extend(fake_candidates(builder, TABLE))
        levels += 1
    small, shallow = builder.trees()
    assert small == TokenTree((1, 10, 11, 12, 20), (-1, 0, 0, 0, 1))  # 4 draft nodes
    assert shallow == TokenTree((1, 10, 11, 12), (-1, 0, 0, 0))  # depth 1
    assert levels == 3


def test_dynamic_builder_expands_likeliest_and_keeps_best_overall():
    builder = DynamicTreeBuilder([1], top_k=2, max_nodes=[4], max_depths=[3])
    frontiers = []
    while any(builder.frontier()):
        frontiers.append([builder.growing[0].token_ids[n] for n in builder.frontier()[0]])
        builder.extend(fake_candidates(builder, TABLE))
    # level 0 expands the root; level 1 the two likeliest of {10: .6, 11: .3};
    # level 2 the two likeliest of {20: .54, 21: .03, 22: .15, 23: .12}
    assert frontiers == [[1], [10, 11], [20, 22]]
    (tree,) = builder.trees()
    # best 4 by path probability: 10 (.6), 20 (.54), 11 (.3), 30 (.27)
    assert tree == TokenTree((1, 10, 11, 20, 30), (-1, 0, 0, 1, 3))
    assert builder.path_probs()[0][:4] == pytest.approx([0.6, 0.54, 0.3, 0.27])


def test_dynamic_selection_is_ancestor_closed_under_ties():
    table = {1: [(5, 1.0)], 5: [(6, 1.0)], 6: [(7, 1.0)]}
    builder = DynamicTreeBuilder([1], top_k=1, max_nodes=[2], max_depths=[3])
    while any(builder.frontier()):
        builder.extend(fake_candidates(builder, table))
    assert builder.trees()[0] == TokenTree((1, 5, 6), (-1, 0, 1))


def test_chain_builder_follows_the_top_candidate_and_keeps_runners_up_as_leaves():
    builder = ChainTreeBuilder([1, 1], top_k=2, max_nodes=[4, 10], max_depths=[3, 2])
    frontiers = []
    while any(builder.frontier()):
        frontiers.append([[builder.growing[s].token_ids[n] for n in f] for s, f in enumerate(builder.frontier())])
        builder.extend(fake_candidates(builder, TABLE))
    # only the top candidate is followed: 1 -> 10 -> 20; sequence 1 stops at depth 2
    assert frontiers == [[[1], [1]], [[10], [10]], [[20], []]]
    short, deep = builder.trees()[1], builder.trees()[0]
    assert short == TokenTree((1, 10, 11, 20, 21), (-1, 0, 0, 1, 1))
    # nodes 10 .6, 11 .3, 20 .54, 21 .03, 30 .27: the best 4
    assert deep == TokenTree((1, 10, 11, 20, 30), (-1, 0, 0, 1, 3))
    assert builder.path_probs()[0] == pytest.approx([0.6, 0.54, 0.3, 0.27, 0.03])


def test_best_num_nodes_maximises_tokens_per_second():
    # verifying costs 10 ms for up to 2 drafts, then 20 ms
    cost = [0.010, 0.010, 0.010, 0.020, 0.020]
    assert best_num_nodes([0.9, 0.8, 0.1, 0.1], cost) == 2  # (1+1.7)/.01 beats (1+1.9)/.02
    assert best_num_nodes([0.9, 0.8, 0.7, 0.7], cost) == 2  # 270 vs 3.4/.02 = 170 tokens/s
    assert best_num_nodes([0.0, 0.0], cost) == 0
    assert best_num_nodes([0.9, 0.9, 0.9, 0.9], [0.01, 0.01, 0.01, 0.01, 0.01]) == 4


def test_merge_deduplicates_identical_paths_round_robin():
    a = TokenTree.from_paths(1, [[2, 3], [4]])
    b = TokenTree.from_paths(1, [[2, 3, 5], [6]])
    merged = merge_trees([a, b], max_nodes=16)
    assert merged == TokenTree.from_paths(1, [[2, 3], [2, 3, 5], [4], [6]])
    assert merged.num_nodes == 6  # 2, 3, 5, 4, 6 plus the root
    assert merge_trees([a, b], max_nodes=3) == TokenTree.from_paths(1, [[2, 3], [2, 3, 5]])
    with pytest.raises(ValueError):
        merge_trees([a, TokenTree((9,), (-1,))], 4)


def scored(paths: list[list[int]], probs: dict[tuple[int, ...], float]) -> TokenTree:
    """A tree of root 1 whose node scores are the products of ``probs`` along each path."""
    tree = TokenTree.from_paths(1, paths)
    scores: list[float] = []
    for key, parent in zip(tree.token_paths(), tree.parents):
        scores.append(1.0 if parent == -1 else scores[parent] * probs[key])
    return TokenTree(tree.token_ids, tree.parents, node_scores=tuple(scores))


def test_merge_of_scored_trees_keeps_the_best_nodes_of_the_union():
    # a, in a dynamic builder's creation order: shallow doubts first, then a deep confident chain
    a = scored([[4], [8], [2, 3, 5, 7]], {(2,): 0.9, (2, 3): 0.9, (2, 3, 5): 0.9, (2, 3, 5, 7): 0.9,
                                          (4,): 0.05, (8,): 0.04})
    b = scored([[6, 9], [2, 3]], {(6,): 0.6, (6, 9): 0.5, (2,): 0.3, (2, 3): 0.5})
    merged = merge_trees([a, b], max_nodes=6)
    # scores: 2 .9, 2-3 .81, 2-3-5 .729, 2-3-5-7 .6561, 6 .6, 6-9 .3; 4 (.05) and 8 (.04) cut
    assert merged == TokenTree.from_paths(1, [[2, 3, 5, 7], [6, 9]])
    assert merged.node_scores == pytest.approx((1.0, 0.9, 0.81, 0.729, 0.6561, 0.6, 0.3))
    # without scores, paths go round-robin in node order: 4, then 6-9, then 8, then 2-3
    unscored = [TokenTree(t.token_ids, t.parents) for t in (a, b)]
    assert merge_trees(unscored, max_nodes=6) == TokenTree.from_paths(1, [[4], [6, 9], [8], [2, 3]])
    assert merge_trees([a, b], max_nodes=5) == TokenTree.from_paths(1, [[2, 3, 5, 7], [6]])
    assert merge_trees([a, b], max_nodes=0) == TokenTree((1,), (-1,))


def test_merge_by_score_takes_a_shared_node_at_its_best_score():
    a = scored([[2], [3]], {(2,): 0.2, (3,): 0.5})
    b = scored([[2]], {(2,): 0.9})
    assert merge_trees([a, b], max_nodes=1) == TokenTree.from_paths(1, [[2]])
    assert merge_trees([a, b], max_nodes=1).node_scores == (1.0, 0.9)


def test_noisy_or_merge_lets_agreeing_drafters_outrank_one_confident_drafter():
    a = scored([[2, 3], [5]], {(2,): 0.6, (2, 3): 0.5, (5,): 0.7})
    b = scored([[2, 3], [6]], {(2,): 0.5, (2, 3): 0.5, (6,): 0.1})
    # max: 2 .6, 2-3 .3, 5 .7, 6 .1; noisy_or: 2 1-.4*.5=.8, 2-3 1-.7*.75=.475, 5 .7, 6 .1
    assert merge_trees([a, b], max_nodes=2) == TokenTree.from_paths(1, [[5], [2]])
    merged = merge_trees([a, b], max_nodes=3, rule="noisy_or")
    assert merged == TokenTree.from_paths(1, [[5], [2, 3]])  # leaves best first: 5 (.7), 2-3 (.475)
    assert merged.node_scores == pytest.approx((1.0, 0.7, 0.8, 0.475))
    # a token path twice in one tree (two children with one token) counts once
    twice = TokenTree((1, 2, 2), (-1, 0, 0), node_scores=(1.0, 0.5, 0.5))
    assert merge_trees([twice, scored([[7]], {(7,): 0.1})], 1, rule="noisy_or").node_scores == (1.0, 0.5)
    with pytest.raises(ValueError, match="merge rule"):
        merge_trees([a, b], 3, rule="sum")


def test_merge_by_score_caps_rising_or_nan_scores_at_the_parent_and_keeps_first_seen_on_ties():
    rising = TokenTree((1, 2, 3, 4), (-1, 0, 1, 0), node_scores=(1.0, 0.2, 0.9, 0.2))  # 2-3 above its parent
    broken = TokenTree((1, 5, 6), (-1, 0, 1), node_scores=(1.0, float("nan"), 0.5))
    # capped: 2 .2, 2-3 .2, 4 .2, 5 0, 5-6 0; ties by depth, then first seen: 2, 4, 2-3
    merged = merge_trees([rising, broken], max_nodes=2)
    assert merged == TokenTree.from_paths(1, [[2], [4]]) and merged.node_scores == (1.0, 0.2, 0.2)
    assert merge_trees([rising, broken], max_nodes=3) == TokenTree.from_paths(1, [[4], [2, 3]])
    assert merge_trees([rising, broken], max_nodes=5).num_nodes == 6  # everything, ancestors first


def test_merge_falls_back_to_round_robin_paths_when_a_tree_has_no_scores():
    a = scored([[2, 3, 5]], {(2,): 0.9, (2, 3): 0.9, (2, 3, 5): 0.9})
    plain = TokenTree.from_paths(1, [[4, 6]])
    merged = merge_trees([a, plain], max_nodes=3)
    assert merged == TokenTree.from_paths(1, [[2, 3, 5]]) and merged.node_scores is None
    # a root-only tree (a drafter with nothing to say) does not turn the scores off
    assert merge_trees([a, TokenTree((1,), (-1,))], max_nodes=2) == TokenTree.from_paths(1, [[2, 3]])


def test_builders_attach_path_probabilities_as_node_scores():
    builder = DynamicTreeBuilder([1], top_k=2, max_nodes=[3], max_depths=[2])
    builder.extend([[[(2, 0.6), (3, 0.3)]]])
    builder.extend([[[(4, 0.5), (5, 0.1)], [(6, 0.9), (7, 0.1)]]])
    tree = builder.trees()[0]
    # best three of 2 (.6), 3 (.3), 2-4 (.3), 2-5 (.06), 3-6 (.27), 3-7 (.03): 2, 3, 2-4
    assert tree == TokenTree((1, 2, 3, 4), (-1, 0, 0, 1))  # creation order
    assert tree.node_scores == pytest.approx((1.0, 0.6, 0.3, 0.3))


def test_paths_within_budget_cut_the_last_path():
    tree = tree_from_paths_within_budget(1, [[2, 3], [2, 4, 5, 6]], max_nodes=4)
    assert tree == TokenTree.from_paths(1, [[2, 3], [2, 4, 5]])  # 4 draft nodes: 2, 3, 4, 5
    # a path wholly inside the tree adds nothing; the cut keeps the shared prefix plus the room
    tree = tree_from_paths_within_budget(1, [[2, 3], [2], [2, 3], [2, 3, 7, 8, 9]], max_nodes=3)
    assert tree == TokenTree.from_paths(1, [[2, 3, 7]])
    assert tree_from_paths_within_budget(1, [[2, 3]], max_nodes=0) == TokenTree((1,), (-1,))


def paths_within_budget_reference(root: int, paths: list[list[int]], max_nodes: int) -> TokenTree:
    """The definition: add paths in order while the whole tree, rebuilt, holds max_nodes drafts."""
    kept: list[list[int]] = []
    for path in paths:
        excess = TokenTree.from_paths(root, kept + [path]).num_nodes - 1 - max_nodes
        if excess > 0:
            if excess < len(path):
                kept.append(path[: len(path) - excess])
            break
        kept.append(path)
    return TokenTree.from_paths(root, kept)


def test_paths_within_budget_equal_the_rebuilding_reference_on_random_paths():
    rng = random.Random(0)
    for _ in range(3000):
        paths = [[rng.randrange(4) for _ in range(rng.randrange(7))] for _ in range(rng.randrange(9))]
        max_nodes = rng.randrange(20)
        assert (tree_from_paths_within_budget(1, paths, max_nodes)
                == paths_within_budget_reference(1, paths, max_nodes)), (paths, max_nodes)
