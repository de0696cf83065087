"""N-gram / prompt-lookup drafter: guesses that the text continues as it did after earlier
occurrences of its own suffix. No model; strong on code, edits and quotes.

For the longest suffix length n (ngram_max down to ngram_min) that occurred before, the
continuations after its most recent occurrences become the tree's paths (deduplicated, most
recent first), each as deep as the budget allows. Guesses are deterministic (point masses).

Each sequence keeps an index (``NgramIndex``: every n-gram, n in [ngram_min, ngram_max], to
the positions it starts at), extended by the tokens appended since the last step, so a lookup
costs the matches it reads (at most ``MAX_SCAN`` per suffix length) rather than a scan of the whole sequence (16 sequences of a few
hundred tokens took about 0.4 ms of Python per step scanned). An n-gram's key is one int
(``ngram_key``), which Python's cyclic garbage collector does not track (a tuple it does); the
pauses of its full collections are kept off the serving path by freezing the heap
(``specserve/engine/gc_heap.py``), not by the keys (``bench.ngram_host --load-model``).

Across requests (as SGLang's n-gram cache and llama.cpp's dynamic lookup cache do), the
drafter keeps the texts of released sequences, prompt and output, in an ``NgramCorpus`` of at
most ``corpus_tokens`` tokens (oldest dropped first): a sequence's own continuations come
first, then up to ``max_paths`` more from the corpus, newest text first, for its longest
suffix of at least 2 tokens found there. Greedy output never depends on it (verification
decides), only how many drafts are accepted; a seeded sampled request, whose text depends on
the trees verified, drafts from its own text alone (``DraftRequest.own_context_only``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from draft_models.base import DraftRequest
from specserve.tree import TokenTree
from specserve.tree.builders import tree_from_paths_within_budget

KEY_BITS = 24  # token ids below 2**24 (every Llama-family vocabulary)
# occurrences of a suffix looked at per lookup, newest first: a suffix frequent in a full corpus
# (a chat template's "assistant" turn: 1,548 times in 60,000 tokens of chat prompts) mostly
# repeats one continuation, and reading every occurrence cost 0.3 ms a lookup (CPU)
MAX_SCAN = 64
# new tokens from which ``index_ngrams`` keys a run whole rather than token by token (CPU)
MIN_KEYED_RUN = 8


def ngram_key(tokens: list[int]) -> int:
    """One int for a token n-gram: its ids side by side, ``KEY_BITS`` bits each (n fixed per dict)."""
    key = 0
    for token in tokens:
        key = (key << KEY_BITS) | token
    return key


def index_ngrams(starts: dict[int, dict[int, list[int]]], tokens: list[int], first_end: int, n_min: int, n_max: int,
                 tag: int = 0) -> None:
    """Append ``tag + s`` to ``starts[n][ngram_key(tokens[s : s + n])]`` for every n-gram, n in
    [n_min, n_max], ending at a position from ``first_end`` on, per n in ascending s (a list that
    was ascending and held only smaller values stays ascending).

    A run of ``MIN_KEYED_RUN`` new tokens or more is keyed whole (``_index_run``): about 0.45 us a
    token for n in [1, 4] where token by token took 1.1 us (``bench.ngram_host --indexing``); a
    shorter one goes token by token, which costs less than building the run's lists."""
    if len(tokens) - first_end < MIN_KEYED_RUN:
        _index_token_by_token(starts, tokens, first_end, n_min, n_max, tag)
    else:
        _index_run(starts, tokens, first_end, n_min, n_max, tag)


def _index_token_by_token(starts: dict[int, dict[int, list[int]]], tokens: list[int], first_end: int, n_min: int,
                          n_max: int, tag: int) -> None:
    """``index_ngrams``, one end at a time: its keys grow one token at a time leftwards."""
    for end in range(first_end, len(tokens)):
        key = 0
        for n in range(1, min(n_max, end + 1) + 1):  # key of tokens[end + 1 - n : end + 1]
            key |= tokens[end + 1 - n] << (KEY_BITS * (n - 1))
            if n >= n_min:
                starts[n].setdefault(key, []).append(tag + end + 1 - n)


def _index_run(starts: dict[int, dict[int, list[int]]], tokens: list[int], first_end: int, n_min: int, n_max: int,
               tag: int) -> None:
    """``index_ngrams``, one n at a time: the keys of the n-grams starting at s = lo, lo + 1, ..
    come in one list from those of the (n - 1)-grams starting at s + 1:
    ``key_n(s) = tokens[s] << KEY_BITS * (n - 1) | key_(n-1)(s + 1)``."""
    keys, first = tokens[first_end:], first_end  # keys[i]: key of the n-gram starting at first + i (n = 1)
    for n in range(1, n_max + 1):
        if n > 1:  # n-grams ending from first_end on start from lo; the (n - 1)-grams from first
            lo, shift = max(first_end + 1 - n, 0), KEY_BITS * (n - 1)
            keys = [token << shift | key for token, key in zip(tokens[lo:], keys[lo + 1 - first :])]
            first = lo
        if n >= n_min:
            starts_n = starts[n]
            for key, start in zip(keys, range(tag + first, tag + first + len(keys))):
                starts_n.setdefault(key, []).append(start)


def first_distinct_paths(lengths: Iterable[int], max_paths: int, candidates: Callable[[int], Iterable[list[int]]],
                         exclude: list[list[int]] = ()) -> list[list[int]]:
    """For the first suffix length in ``lengths`` that yields any: up to ``max_paths`` distinct
    non-empty paths among the first ``MAX_SCAN`` of ``candidates(n)`` (newest first), none in
    ``exclude`` (empty, repeated and excluded candidates count towards ``MAX_SCAN``: a suffix
    whose newest occurrences all repeat excluded paths falls back to a shorter one)."""
    for n in lengths:
        paths: list[list[int]] = []
        for path in itertools.islice(candidates(n), MAX_SCAN):
            if path and path not in paths and path not in exclude:
                paths.append(path)
                if len(paths) == max_paths:
                    break
        if paths:
            return paths
    return []


def longest_suffix_paths(
    tokens: list[int], depth: int, n_min: int, n_max: int, max_paths: int,
    occurrences: Callable[[int], Iterable[int]],
) -> list[list[int]]:
    """Up to ``max_paths`` distinct continuations (at most ``depth`` tokens each) of the longest
    suffix, n in [n_min, n_max], that occurred before; ``occurrences(n)``: the earlier starts of
    the n-token suffix, newest first (the suffix's own start excluded)."""
    return first_distinct_paths(range(min(n_max, len(tokens) - 1), n_min - 1, -1), max_paths,
                                lambda n: (tokens[start + n : start + n + depth] for start in occurrences(n)))


def scan_continuations(token_ids: list[int], depth: int, n_min: int, n_max: int, max_paths: int) -> list[list[int]]:
    """The reference of ``NgramIndex.continuations``: scan the whole sequence for each suffix
    length, newest occurrence first (what the drafter did before it kept an index; like it,
    reading at most ``MAX_SCAN`` occurrences)."""
    n_tokens = len(token_ids)

    def occurrences(n: int) -> Iterable[int]:
        suffix = token_ids[n_tokens - n :]
        return (s for s in range(n_tokens - n - 1, -1, -1) if token_ids[s : s + n] == suffix)

    return longest_suffix_paths(token_ids, depth, n_min, n_max, max_paths, occurrences)


class NgramIndex:
    """Start positions of every n-gram of one token sequence, n in [n_min, n_max], in order.

    Invariant: ``starts[n][key]`` lists, ascending, every s with ngram_key(tokens[s : s + n]) == key.
    """

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        self.starts: dict[int, dict[int, list[int]]] = {n: {} for n in range(n_min, n_max + 1)}

    def sync(self, token_ids: list[int]) -> None:
        """Index ``token_ids``, which must continue what is indexed (an engine sequence only
        grows; a reused id must be released first). A cheap guard rebuilds when the length
        shrank or the first or last indexed token changed; other rewrites go unseen."""
        known = len(self.tokens)
        if len(token_ids) < known or (known and (token_ids[known - 1], token_ids[0]) != (self.tokens[-1], self.tokens[0])):
            self.__init__(self.n_min, self.n_max)
            known = 0
        new = token_ids[known:]
        if new and not (0 <= min(new) and max(new) < 1 << KEY_BITS):
            bad = next(token for token in new if not 0 <= token < 1 << KEY_BITS)
            raise ValueError(f"token id {bad} does not fit an n-gram key")
        self.tokens.extend(new)
        index_ngrams(self.starts, self.tokens, known, self.n_min, self.n_max)  # n-grams ending at new tokens

    def continuations(self, depth: int, max_paths: int) -> list[list[int]]:
        """Up to ``max_paths`` distinct continuations of the longest recurring suffix, newest first."""
        tokens, n_tokens = self.tokens, len(self.tokens)

        def occurrences(n: int) -> Iterable[int]:  # the suffix's own start is the newest: skipped
            starts = self.starts[n].get(ngram_key(tokens[n_tokens - n :]), ())
            return (s for s in reversed(starts) if s <= n_tokens - n - 1)

        return longest_suffix_paths(tokens, depth, self.n_min, self.n_max, max_paths, occurrences)


class NgramCorpus:
    """Earlier sequences' texts (documents) and the starts of their n-grams, n in [n_min, n_max],
    at most ``max_tokens`` tokens in all: adding a document drops the oldest ones over the limit.

    Documents are indexed lazily, at the first lookup after they were added: an engine whose
    requests draft rarely (its batch gate closed) keeps a released sequence's text at the cost of
    a list, and a document dropped before any lookup is never indexed. Lookups see exactly what
    indexing every document when added would give.

    Invariant: ``starts[n][key]`` lists, oldest first, ``number << 32 | start`` (an int, untracked
    by the garbage collector) of every n-gram ``key`` of a kept document numbered below
    ``next_unindexed``, or of a dropped one (numbers below ``first``), which lookups skip; once
    dropped entries may outnumber kept ones the index is rebuilt.
    """

    def __init__(self, max_tokens: int, n_min: int = 2, n_max: int = 4) -> None:
        if max_tokens < 0 or not 1 <= n_min <= n_max:
            raise ValueError("a corpus needs max_tokens >= 0 and 1 <= n_min <= n_max")
        self.max_tokens, self.n_min, self.n_max = max_tokens, n_min, n_max
        self.docs: dict[int, list[int]] = {}  # number -> tokens, oldest first
        self.first = self.next = 0  # kept documents are numbered first .. next - 1
        self.next_unindexed = 0  # documents numbered from here on are not indexed yet
        self.num_tokens = 0  # tokens of the kept documents
        self.num_indexed = 0  # tokens indexed, dropped documents' included
        self.starts: dict[int, dict[int, list[int]]] = {n: {} for n in range(n_min, n_max + 1)}

    def add(self, tokens: list[int]) -> None:
        """Keep ``tokens`` (their last ``max_tokens``) as the newest document; indexed at the next lookup."""
        tokens = list(tokens[-self.max_tokens :]) if self.max_tokens else []  # (< 2**32 tokens: max_tokens is capped)
        if len(tokens) <= self.n_min:
            return
        number, self.next = self.next, self.next + 1
        self.docs[number] = tokens
        self.num_tokens += len(tokens)
        while self.num_tokens > self.max_tokens:
            self.num_tokens -= len(self.docs.pop(self.first))
            self.first += 1

    def index_pending(self) -> None:
        """Index the kept documents added since the last lookup (in order: entries stay oldest first)."""
        if self.next_unindexed == self.next:
            return
        for number in range(max(self.next_unindexed, self.first), self.next):
            self._index(number, self.docs[number])
        self.next_unindexed = self.next
        if self.num_indexed > 2 * self.num_tokens:  # mostly dropped entries: rebuild
            self.starts = {n: {} for n in self.starts}
            self.num_indexed = 0
            for number, doc in self.docs.items():
                self._index(number, doc)

    def _index(self, number: int, tokens: list[int]) -> None:
        self.num_indexed += len(tokens)
        index_ngrams(self.starts, tokens, 0, self.n_min, self.n_max, number << 32)  # number << 32 | start

    def continuations(self, context: list[int], depth: int, max_paths: int, exclude: list[list[int]]) -> list[list[int]]:
        """Up to ``max_paths`` distinct continuations (at most ``depth`` tokens) in the corpus of the
        longest suffix of ``context`` it holds (n in [n_min, n_max]), newest first, none in ``exclude``."""
        self.index_pending()

        def candidates(n: int) -> Iterator[list[int]]:
            for entry in reversed(self.starts[n].get(ngram_key(context[len(context) - n :]), ())):
                number, start = entry >> 32, entry & 0xFFFFFFFF
                if number < self.first:
                    return  # older entries are all dropped
                yield self.docs[number][start + n : start + n + depth]

        return first_distinct_paths(range(min(self.n_max, len(context)), self.n_min - 1, -1), max_paths, candidates,
                                    exclude)


class NgramDrafter:
    needs_target_states = False

    def __init__(self, ngram_max: int = 4, ngram_min: int = 1, max_paths: int = 4, corpus_tokens: int = 0,
                 score: float | None = None) -> None:
        """``corpus_tokens``: tokens of released sequences kept for lookups across requests (0: none).
        ``score``: trees carry node scores ``score ** depth`` (a merge then weighs them against
        model drafters' path probabilities); None: unscored trees."""
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError("ngram sizes need 1 <= ngram_min <= ngram_max")
        if score is not None and not 0 < score <= 1:
            raise ValueError(f"an n-gram score must lie in (0, 1], not {score}")
        self.score = score
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min
        self.max_paths = max_paths
        self.indexes: dict[str, NgramIndex] = {}  # per sequence, until ``release``
        self.corpus = NgramCorpus(corpus_tokens, max(2, ngram_min), max(2, ngram_max)) if corpus_tokens else None

    def continuations(self, token_ids: list[int], depth: int) -> list[list[int]]:
        """Up to ``max_paths`` distinct continuations of the longest recurring suffix of
        ``token_ids``, newest first (a one-off index; ``propose`` keeps one per sequence)."""
        index = NgramIndex(self.ngram_min, self.ngram_max)
        index.sync(list(token_ids))
        return index.continuations(depth, self.max_paths)

    def propose(self, requests: list[DraftRequest]) -> list[TokenTree]:
        trees = []
        for request in requests:
            root = request.token_ids[-1]
            if request.max_tree_tokens == 0 or request.max_depth == 0:
                trees.append(TokenTree((root,), (-1,)))
                continue
            index = self.indexes.get(request.seq_id)
            if index is None:
                index = self.indexes[request.seq_id] = NgramIndex(self.ngram_min, self.ngram_max)
            index.sync(request.token_ids)
            paths = index.continuations(request.max_depth, self.max_paths)
            if self.corpus is not None and not request.own_context_only:
                paths += self.corpus.continuations(index.tokens, request.max_depth, self.max_paths, paths)
            tree = tree_from_paths_within_budget(root, paths, request.max_tree_tokens)
            if self.score is not None:
                tree = replace(tree, node_scores=tuple(self.score**depth for depth in tree.depths()))
            trees.append(tree)
        return trees

    def commit(self, seq_id: str, num_committed: int) -> None:
        return None

    def observe(self, seq_id: str, first_position: int, states) -> None:
        return None

    def release(self, seq_id: str) -> None:
        """Forget the sequence; its text joins the corpus (if kept)."""
        index = self.indexes.pop(seq_id, None)
        if index is not None and self.corpus is not None:
            self.corpus.add(index.tokens)

