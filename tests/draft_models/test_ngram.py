import random

import pytest

from draft_models.base import DraftRequest
from draft_models.ngram import (
    KEY_BITS,
    MAX_SCAN,
    MIN_KEYED_RUN,
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


def test_a_scored_drafter_gives_each_node_its_score_to_the_power_of_its_depth():
    tokens = [4, 5, 6, 7, 4, 5, 8, 9, 4, 5]
    request = DraftRequest("s", tokens, max_tree_tokens=5, max_depth=3)
    (tree,) = NgramDrafter(ngram_max=2, max_paths=2, score=0.5).propose([request])
    assert tree == TokenTree.from_paths(5, [[8, 9, 4], [6, 7]])  # the unscored drafter's tree
    assert tree.node_scores == (1.0, 0.5, 0.25, 0.125, 0.5, 0.25)
    assert NgramDrafter(ngram_max=2, max_paths=2).propose([request])[0].node_scores is None
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="score"):
            NgramDrafter(score=bad)


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
        corpus.continuations([20 + k, 21 + k], depth=1, max_paths=4, exclude=[])  # indexes the document
        assert corpus.num_indexed <= 2 * corpus.num_tokens
        assert corpus.num_tokens <= 10
    assert corpus.continuations([2, 3], depth=1, max_paths=4, exclude=[]) == []
    assert corpus.continuations([24, 25], depth=1, max_paths=4, exclude=[]) == [[26]]


def test_corpus_indexes_documents_at_the_next_lookup_and_never_those_dropped_before():
    corpus = NgramCorpus(max_tokens=10)
    corpus.add([1, 2, 3, 4])
    corpus.add([5, 2, 3, 6])
    assert (corpus.num_indexed, corpus.next_unindexed, corpus.starts[2]) == (0, 0, {})
    assert corpus.continuations([2, 3], depth=1, max_paths=4, exclude=[]) == [[6], [4]]
    assert (corpus.num_indexed, corpus.next_unindexed) == (8, 2)
    corpus.add([7, 8, 9, 10, 11])  # 13 tokens: document 0 goes (indexed already)
    corpus.add([12, 13, 14])  # 12 tokens: document 1 goes
    corpus.add([15, 2, 3, 16])  # 12 tokens: document 2 goes, never indexed
    assert (corpus.first, corpus.next, corpus.num_tokens, corpus.num_indexed) == (3, 5, 7, 8)
    assert corpus.continuations([2, 3], depth=1, max_paths=4, exclude=[]) == [[16]]
    assert corpus.continuations([7, 8], depth=1, max_paths=4, exclude=[]) == []
    assert corpus.continuations([12, 13], depth=1, max_paths=4, exclude=[]) == [[14]]
    assert (corpus.num_indexed, corpus.next_unindexed) == (7, 5)  # 8 + 7 indexed > 2 x 7 kept: rebuilt


class EagerCorpus(NgramCorpus):
    """The corpus as it was: every document indexed when added."""

    def add(self, tokens: list[int]) -> None:
        super().add(tokens)
        self.index_pending()


def test_lookups_of_the_lazy_corpus_equal_indexing_every_document_when_added():
    rng = random.Random(3)
    lazy, eager = NgramCorpus(max_tokens=300), EagerCorpus(max_tokens=300)
    num_nonempty = 0
    for _ in range(400):
        if rng.random() < 0.3:
            doc = [rng.randrange(12) for _ in range(rng.randint(1, 90))]
            lazy.add(doc)
            eager.add(doc)
            continue
        context = [rng.randrange(12) for _ in range(rng.randint(1, 6))]
        depth, max_paths = rng.randint(1, 6), rng.randint(1, 4)
        exclude = [[rng.randrange(12)]] if rng.random() < 0.3 else []
        found = lazy.continuations(context, depth, max_paths, exclude)
        assert found == eager.continuations(context, depth, max_paths, exclude)
        num_nonempty += bool(found)
    assert num_nonempty > 100 and lazy.first > 10  # lookups found paths, documents were dropped


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


def reference_starts(tokens: list[int], n_min: int, n_max: int, tag: int = 0) -> dict[int, dict[int, list[int]]]:
    """The index by its definition: ``starts[n][ngram_key(tokens[s : s + n])]`` lists ``tag + s``
    for every s, ascending (each n-gram sliced and keyed on its own)."""
    starts: dict[int, dict[int, list[int]]] = {n: {} for n in range(n_min, n_max + 1)}
    for n in starts:
        for s in range(len(tokens) - n + 1):
            starts[n].setdefault(ngram_key(tokens[s : s + n]), []).append(tag + s)
    return starts


def random_tokens(rng: random.Random, num_tokens: int, kind: str) -> list[int]:
    """Ids from a tiny alphabet (suffixes recur), from the top of the key width, or both."""
    top = (1 << KEY_BITS) - 1
    alphabet = {"small": [0, 1, 2, 3], "top": [top, top - 1, top - 2], "mixed": [0, 1, top, top - 1]}[kind]
    return [rng.choice(alphabet) for _ in range(num_tokens)]


def test_the_index_synced_in_runs_of_any_size_equals_its_definition_and_a_scan():
    """Many sequences, each synced in runs of random sizes (token by token below MIN_KEYED_RUN,
    keyed whole from it on): identical ``starts`` (every list in order) and identical lookups."""
    assert MIN_KEYED_RUN == 8
    rng = random.Random(7)
    num_paths = num_runs_keyed_whole = 0
    for seq in range(120):
        n_min = rng.choice([1, 1, 2, 3])
        n_max = n_min + rng.randint(0, 3)
        index = NgramIndex(n_min, n_max)
        tokens = []
        for _ in range(rng.randint(1, 6)):
            run = rng.choice([1, 2, 3, 7, 8, 9, 16, 61, 130, 300])
            tokens = tokens + random_tokens(rng, run, ["small", "top", "mixed"][seq % 3])
            index.sync(tokens)
            num_runs_keyed_whole += run >= MIN_KEYED_RUN
            assert index.tokens == tokens
            assert index.starts == reference_starts(tokens, n_min, n_max)
            depth, max_paths = rng.randint(1, 5), rng.randint(1, 4)
            paths = index.continuations(depth, max_paths)
            assert paths == scan_continuations(tokens, depth, n_min, n_max, max_paths)
            num_paths += len(paths)
    assert num_paths > 300 and num_runs_keyed_whole > 150


def test_the_corpus_index_equals_its_definition_document_by_document():
    rng = random.Random(8)
    corpus = NgramCorpus(max_tokens=100_000, n_min=2, n_max=4)
    expected: dict[int, dict[int, list[int]]] = {n: {} for n in range(2, 5)}
    for number in range(40):
        doc = random_tokens(rng, rng.choice([3, 5, 8, 9, 40, 300]), ["small", "top", "mixed"][number % 3])
        corpus.add(doc)
        for n, starts in reference_starts(doc, 2, 4, number << 32).items():
            for key, found in starts.items():
                expected[n].setdefault(key, []).extend(found)
        if rng.random() < 0.5:
            corpus.index_pending()
            assert corpus.starts == expected
    corpus.index_pending()
    assert corpus.starts == expected


def test_an_id_out_of_range_anywhere_in_a_long_run_is_refused_and_nothing_is_indexed():
    for bad in (-1, 1 << KEY_BITS):
        index = NgramIndex(1, 4)
        index.sync([5, 6])
        with pytest.raises(ValueError, match=f"token id {bad} does not fit"):
            index.sync([5, 6] + [7] * 20 + [bad] + [8] * 20)
        assert (index.tokens, index.starts) == ([5, 6], reference_starts([5, 6], 1, 4))


def test_a_request_that_must_reproduce_drafts_from_its_own_text_only():
    drafter = NgramDrafter(max_paths=2, corpus_tokens=1000)
    drafter.propose([DraftRequest("a", [40, 41, 42, 43, 44], 8, 3)])
    drafter.release("a")
    (tree,) = drafter.propose([DraftRequest("b", [7, 8, 41, 42], 8, 3, own_context_only=True)])
    assert tree.num_nodes == 1
