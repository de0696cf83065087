"""The token tree: one speculative step's guesses for one sequence, as plain data.

Node 0 is the root: the sequence's last committed-but-not-yet-cached token (the token the
target must read next). Every other node is a draft guess whose parent is an earlier node::

    token_ids  [num_nodes]  node i's token
    parents    [num_nodes]  parents[0] == -1, 0 <= parents[i] < i for i > 0 (topological order)

``draft_probs`` (optional) holds, for node i > 0, the distribution the drafter drew node i's
token from, over the vocabulary: [num_nodes, vocab_size], row 0 unused. A tree without it
was built deterministically (top-k / greedy expansion): each guess counts as a point mass,
which multi-step speculative sampling handles exactly.

``node_scores`` (optional) is the drafter's estimate of each node's chance of acceptance, its
path probability (the product of the draft probabilities from the root; 1.0 for the root).
Only tree merging reads it; a child never scores above its parent.

A prefill chunk is a chain (parents[i] == i - 1); a plain decode step is the root alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TokenTree:
    token_ids: tuple[int, ...]
    parents: tuple[int, ...]
    draft_probs: torch.Tensor | None = field(default=None, compare=False)  # [num_nodes, vocab]
    node_scores: tuple[float, ...] | None = field(default=None, compare=False)  # [num_nodes]

    def __post_init__(self) -> None:
        if len(self.token_ids) == 0:
            raise ValueError("a token tree needs at least its root")
        if len(self.parents) != len(self.token_ids):
            raise ValueError(
                f"{len(self.token_ids)} tokens but {len(self.parents)} parents in a token tree"
            )
        if self.parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        for i, parent in enumerate(self.parents[1:], start=1):
            if not 0 <= parent < i:
                raise ValueError(f"node {i} has parent {parent}: parents must come first")
        if self.draft_probs is not None and self.draft_probs.shape[0] != len(self.token_ids):
            raise ValueError("draft_probs needs one row per node")
        if self.node_scores is not None and len(self.node_scores) != len(self.token_ids):
            raise ValueError("node_scores needs one score per node")

    @classmethod
    def chain(cls, token_ids: list[int] | tuple[int, ...]) -> TokenTree:
        """A chain: each token's parent is the token before it (causal prefill or a single path)."""
        return cls(tuple(token_ids), tuple(range(-1, len(token_ids) - 1)))

    @classmethod
    def from_paths(cls, root_id: int, paths: list[list[int]]) -> TokenTree:
        """Build from root-excluded token paths; shared prefixes become shared nodes.

        Nodes are numbered in the order they first appear (paths in order, each root to leaf),
        so the result is topological and deterministic.
        """
        token_ids = [root_id]
        parents = [-1]
        child_of: dict[tuple[int, int], int] = {}
        for path in paths:
            node = 0
            for token in path:
                key = (node, token)
                if key not in child_of:
                    child_of[key] = len(token_ids)
                    token_ids.append(token)
                    parents.append(node)
                node = child_of[key]
        return cls(tuple(token_ids), tuple(parents))

    @property
    def num_nodes(self) -> int:
        return len(self.token_ids)

    @property
    def is_chain(self) -> bool:
        return all(parent == i - 1 for i, parent in enumerate(self.parents))

    def depths(self) -> list[int]:
        """depths[i]: edges from the root to node i (the root has depth 0)."""
        depths = [0] * self.num_nodes
        for i in range(1, self.num_nodes):
            depths[i] = depths[self.parents[i]] + 1
        return depths

    def positions(self, prefix_len: int) -> list[int]:
        """Model positions of the nodes when ``prefix_len`` tokens are already cached."""
        return [prefix_len + depth for depth in self.depths()]

    def children(self) -> list[list[int]]:
        """children[i]: node i's children in increasing index order."""
        children: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for i in range(1, self.num_nodes):
            children[self.parents[i]].append(i)
        return children

    def token_paths(self) -> list[tuple[int, ...]]:
        """token_paths()[i]: the tokens from the root's child to node i (() for the root), the
        key by which node i is the same node in another tree of the same root."""
        paths: list[tuple[int, ...]] = []
        for token, parent in zip(self.token_ids, self.parents):
            paths.append(() if parent == -1 else paths[parent] + (token,))
        return paths

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to ``node``, both included."""
        path = [node]
        while self.parents[path[-1]] != -1:
            path.append(self.parents[path[-1]])
        return path[::-1]

    def leaves(self) -> list[int]:
        has_child = set(self.parents[1:])
        return [i for i in range(self.num_nodes) if i not in has_child]

    def paths(self) -> list[list[int]]:
        """Every root-to-leaf path, as node indices, leaves in index order."""
        return [self.path_to(leaf) for leaf in self.leaves()]

    def mask(self) -> torch.Tensor:
        """[num_nodes, num_nodes] bool: mask[i, j] iff j is i or an ancestor of i."""
        mask = torch.zeros(self.num_nodes, self.num_nodes, dtype=torch.bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                mask[i] = mask[parent]
            mask[i, i] = True
        return mask
