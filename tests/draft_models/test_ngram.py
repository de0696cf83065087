import random

import pytest

from draft_models.base import DraftRequest
from draft_models.ngram import (
    KEY_BITS,
    MAX_SCAN,
    NgramCorpus,
    NgramDrafter,
    NgramIndex,
    ngram_key,
    scan_continuations,
)
from specserve.tree import TokenTree
from specserve.tree.builders import tree_from_paths_within_budget


def test_longest_recurring_suffix_newest_first():
    drafter = NgramDrafter(ngram_max=3, ngram_min=1, max_paths=2)
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    # suffix [1, 2, 3] occurred at 4 (then 7, 8) and at 0 (then 9, 1)
    assert drafter.continuations(tokens, 2) == [[7, 8], [9, 1]]


def test_falls_back_to_shorter_suffix_and_nothing_without_match():
    drafter = NgramDrafter(ngram_max=3, ngram_min=1, max_paths=4)
    assert drafter.continuations([5, 6, 7, 6], 3) == [[7, 6]]
    assert drafter.continuations([1, 2, 3], 3) == []
    assert drafter.continuations([5, 6, 7, 6], 0) == []  # no depth, no path


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


def test_the_incremental_index_equals_a_full_scan_at_every_step():
    """One sequence growing by 1-3 tokens a step (as accepted drafts extend it) over a small
    alphabet, so suffixes recur; the kept index must answer what a scan answers."""
    rng = random.Random(0)
    drafter = NgramDrafter(ngram_max=4, ngram_min=1, max_paths=3)
    tokens = [rng.randrange(5) for _ in range(3)]
    checked = 0
    while len(tokens) < 300:
        (tree,) = drafter.propose([DraftRequest("s", tokens, max_tree_tokens=12, max_depth=4)])
        paths = scan_continuations(tokens, 4, 1, 4, 3)
        assert tree == tree_from_paths_within_budget(tokens[-1], paths, 12)
        assert drafter.continuations(tokens, 4) == paths
        checked += bool(paths)
        tokens = tokens + [rng.randrange(5) for _ in range(rng.randint(1, 3))]
    assert checked > 100


def test_a_sequence_that_does_not_continue_its_index_is_reindexed_and_release_forgets_it():
    drafter = NgramDrafter(ngram_max=2, ngram_min=1, max_paths=2)
    drafter.propose([DraftRequest("s", [1, 2, 3, 1, 2], max_tree_tokens=4, max_depth=2)])
    other = [7, 8, 7, 9, 7]  # same id, other tokens (reused without a release; the guard sees the first token)
    (tree,) = drafter.propose([DraftRequest("s", other, max_tree_tokens=4, max_depth=2)])
    assert tree == tree_from_paths_within_budget(7, scan_continuations(other, 2, 1, 2, 2), 4)
    assert tree == TokenTree.from_paths(7, [[9, 7], [8, 7]])
    drafter.release("s")
    assert drafter.indexes == {}


def test_corpus_gives_the_newest_continuations_of_the_longest_suffix_it_holds():
    corpus = NgramCorpus(max_tokens=100)
    corpus.add([1, 2, 3, 4, 5, 6])
    corpus.add([9, 2, 3, 7, 8])
    corpus.add([1])  # too short to hold an n-gram of 2: ignored
    assert corpus.next == 2
    # suffix (2, 3) occurs in both documents: the newest first; (1, 2, 3) only in the first
    assert corpus.continuations([5, 2, 3], depth=2, max_paths=4, exclude=[]) == [[7, 8], [4, 5]]
    assert corpus.continuations([1, 2, 3], depth=3, max_paths=4, exclude=[]) == [[4, 5, 6]]
    assert corpus.continuations([0, 2, 3], depth=2, max_paths=4, exclude=[[7, 8]]) == [[4, 5]]
    assert corpus.continuations([7, 3], depth=2, max_paths=4, exclude=[]) == []  # single tokens never match


def test_lookups_read_at_most_max_scan_occurrences_newest_first():
    """A suffix that recurs more than MAX_SCAN times, always followed by the same tokens: its
    lookups read the newest MAX_SCAN occurrences only, so a different continuation older than
    those is not found (in the corpus and in a sequence's own context), but one among them is."""
    assert MAX_SCAN == 64
    old, repeated = [1, 2, 3, 40, 41], [1, 2, 3, 50, 51]
    corpus = NgramCorpus(max_tokens=10_000)
    corpus.add(old)
    for _ in range(MAX_SCAN):
        corpus.add(repeated)
    assert corpus.continuations([9, 2, 3], depth=2, max_paths=4, exclude=[]) == [[50, 51]]
    corpus.add(old)  # now among the newest MAX_SCAN
    assert corpus.continuations([9, 2, 3], depth=2, max_paths=4, exclude=[]) == [[40, 41], [50, 51]]
    drafter = NgramDrafter(ngram_max=3, ngram_min=1, max_paths=4)
    context = old + repeated * MAX_SCAN + [1, 2, 3]
    assert drafter.continuations(context, 2) == [[50, 51]]
    assert drafter.continuations(old + repeated * (MAX_SCAN - 1) + [1, 2, 3], 2) == [[50, 51], [40, 41]]


def test_corpus_drops_the_oldest_documents_and_rebuilds_its_index():
    corpus = NgramCorpus(max_tokens=10)
    corpus.add([1, 2, 3, 4])
    corpus.add([5, 2, 3, 6])
    corpus.add([7, 2, 3, 8, 9])  # 13 tokens: the first document goes
    assert (corpus.first, corpus.num_tokens) == (1, 9)
    assert corpus.continuations([2, 3], depth=1, max_paths=4, exclude=[]) == [[8], [6]]
    for k in range(6):  # dropped entries pile up until the index is rebuilt from what is kept
        corpus.add([20 + k, 21 + k, 22 + k])
        assert corpus.num_indexed <= 2 * corpus.num_tokens
        assert corpus.num_tokens <= 10
    assert corpus.continuations([2, 3], depth=1, max_paths=4, exclude=[]) == []
    assert corpus.continuations([24, 25], depth=1, max_paths=4, exclude=[]) == [[26]]


def test_a_released_sequence_drafts_for_the_next_one_after_its_own_context():
    first = [40, 41, 42, 43, 44, 45, 46]
    drafter = NgramDrafter(max_paths=2, corpus_tokens=1000)
    drafter.propose([DraftRequest("a", first, 8, 3)])
    drafter.release("a")
    # b's suffix (41, 42) is not in its own context: the corpus continues it as a did
    (tree,) = drafter.propose([DraftRequest("b", [7, 8, 41, 42], 8, 3)])
    assert tree == tree_from_paths_within_budget(42, [[43, 44, 45]], 8)
    # own continuations come first, then the corpus's
    (tree,) = drafter.propose([DraftRequest("c", [42, 9, 41, 42], 8, 3)])
    assert tree == tree_from_paths_within_budget(42, [[9, 41, 42], [43, 44, 45]], 8)
    alone = NgramDrafter(max_paths=2)
    alone.propose([DraftRequest("a", first, 8, 3)])
    alone.release("a")
    assert alone.propose([DraftRequest("b", [7, 8, 41, 42], 8, 3)])[0].num_nodes == 1


def test_ngram_keys_are_ints_and_ids_beyond_their_width_are_refused():
    index = NgramIndex(1, 3)
    index.sync([5, 6, 5, 6])
    assert all(isinstance(key, int) for starts in index.starts.values() for key in starts)
    assert index.starts[2][ngram_key([5, 6])] == [0, 2]
    assert ngram_key([5, 6]) == (5 << KEY_BITS) | 6
    with pytest.raises(ValueError, match="n-gram key"):
        NgramIndex(1, 2).sync([1, 1 << KEY_BITS])


def test_a_request_that_must_reproduce_drafts_from_its_own_text_only():
    drafter = NgramDrafter(max_paths=2, corpus_tokens=1000)
    drafter.propose([DraftRequest("a", [40, 41, 42, 43, 44], 8, 3)])
    drafter.release("a")
    (tree,) = drafter.propose([DraftRequest("b", [7, 8, 41, 42], 8, 3, own_context_only=True)])
    assert tree.num_nodes == 1
