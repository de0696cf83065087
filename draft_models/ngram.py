"""N-gram / prompt-lookup drafter: guesses that the text continues as it did after earlier
occurrences of its own suffix. No model, no state; strong on code, edits and quotes.

For the longest suffix length n (ngram_max down to ngram_min) that occurred before, the
continuations after its most recent occurrences become the tree's paths (deduplicated, most
recent first), each as deep as the budget allows. Guesses are deterministic (point masses).
"""

from __future__ import annotations

from draft_models.base import DraftRequest
from specserve.tree import TokenTree
from specserve.tree.builders import tree_from_paths_within_budget


class NgramDrafter:
    needs_target_states = False

    def __init__(self, ngram_max: int = 4, ngram_min: int = 1, max_paths: int = 4) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError("ngram sizes need 1 <= ngram_min <= ngram_max")
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min
        self.max_paths = max_paths

    def continuations(self, token_ids: list[int], depth: int) -> list[list[int]]:
        """Up to ``max_paths`` distinct continuations of the longest recurring suffix, newest first."""
        n_tokens = len(token_ids)
        for n in range(min(self.ngram_max, n_tokens - 1), self.ngram_min - 1, -1):
            suffix = token_ids[n_tokens - n :]
            paths: list[list[int]] = []
            for start in range(n_tokens - n - 1, -1, -1):  # newest occurrence first
                if token_ids[start : start + n] == suffix:
                    path = token_ids[start + n : start + n + depth]
                    if path and path not in paths:
                        paths.append(path)
                        if len(paths) == self.max_paths:
                            break
            if paths:
                return paths
        return []

    def propose(self, requests: list[DraftRequest]) -> list[TokenTree]:
        trees = []
        for request in requests:
            token_ids = list(request.token_ids)
            root = token_ids[-1]
            if request.max_tree_tokens == 0 or request.max_depth == 0:
                trees.append(TokenTree((root,), (-1,)))
                continue
            paths = self.continuations(token_ids, request.max_depth)
            trees.append(tree_from_paths_within_budget(root, paths, request.max_tree_tokens))
        return trees

    def commit(self, seq_id: str, num_committed: int) -> None:
        return None

    def observe(self, seq_id: str, first_position: int, states) -> None:
        return None

    def release(self, seq_id: str) -> None:
        return None

