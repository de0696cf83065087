from draft_models.base import DraftRequest
from draft_models.ngram import NgramDrafter
from specserve.tree import TokenTree


def test_longest_recurring_suffix_newest_first():
    drafter = NgramDrafter(ngram_max=3, ngram_min=1, max_paths=2)
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    # suffix [1, 2, 3] occurred at 4 (then 7, 8) and at 0 (then 9, 1)
    assert drafter.continuations(tokens, 2) == [[7, 8], [9, 1]]


def test_falls_back_to_shorter_suffix_and_nothing_without_match():
    drafter = NgramDrafter(ngram_max=3, ngram_min=1, max_paths=4)
    assert drafter.continuations([5, 6, 7, 6], 3) == [[7, 6]]
    assert drafter.continuations([1, 2, 3], 3) == []


def test_propose_builds_budgeted_tree_rooted_at_last_token():
    drafter = NgramDrafter(ngram_max=2, ngram_min=1, max_paths=2)
    tokens = [4, 5, 6, 7, 4, 5, 8, 9, 4, 5]
    (tree,) = drafter.propose([DraftRequest("s", tokens, max_tree_tokens=3, max_depth=3)])
    # suffix [4, 5] was followed by [8, 9, 4] (newest) and [6, 7, 4]; budget 3 keeps the first path
    assert tree == TokenTree.from_paths(5, [[8, 9, 4]])
    (tree,) = drafter.propose([DraftRequest("s", tokens, max_tree_tokens=5, max_depth=3)])
    assert tree == TokenTree.from_paths(5, [[8, 9, 4], [6, 7]])
    (empty,) = drafter.propose([DraftRequest("s", [1, 2, 3], max_tree_tokens=5, max_depth=3)])
    assert empty == TokenTree((3,), (-1,))
