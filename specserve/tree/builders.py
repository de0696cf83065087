"""Tree builders: how a model drafter's per-node guesses become one token tree per sequence.

A builder grows the trees of a batch of sequences level by level::

    builder = StaticTreeBuilder(roots, widths, max_nodes)      # or DynamicTreeBuilder(...)
    while any(frontier := builder.frontier()):
        candidates = drafter's top candidates (token, prob) for every frontier node
        builder.extend(candidates)
    counts = policy(builder.path_probs())       # optional: how many ranked nodes to keep
    trees = builder.trees(counts)

Node bookkeeping per sequence: node 0 is the root; ``parents[i] < i`` (creation order is
topological); ``path_prob[i]`` is the product of the draft probabilities along the path from
the root (1.0 for the root), EAGLE-2's estimate of the chance the target accepts node i.

Guesses are deterministic (the top candidates, not samples), so the trees carry no
``draft_probs``: verification treats each guess as a point mass, which keeps multi-step
speculative sampling exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from specserve.config import MERGE_RULES
from specserve.tree.token_tree import TokenTree

Candidates = list[tuple[int, float]]  # (token_id, draft probability), most likely first


@dataclass
class _GrowingTree:
    token_ids: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    depths: list[int] = field(default_factory=lambda: [0])
    path_probs: list[float] = field(default_factory=lambda: [1.0])

    def add(self, parent: int, token_id: int, prob: float) -> int:
        self.token_ids.append(token_id)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.path_probs.append(self.path_probs[parent] * prob)
        return len(self.token_ids) - 1

    def subtree(self, keep: list[int]) -> TokenTree:
        """The tree of the nodes in ``keep`` (ancestor-closed), renumbered in creation order, its
        path probabilities as node scores."""
        keep = sorted(set(keep) | {0})
        index = {old: new for new, old in enumerate(keep)}
        return TokenTree(
            tuple(self.token_ids[i] for i in keep),
            tuple(-1 if i == 0 else index[self.parents[i]] for i in keep),
            node_scores=tuple(self.path_probs[i] for i in keep),
        )

    def path_closure(self, nodes: list[int]) -> list[int]:
        """Every node on the paths from the root to ``nodes``, in creation order."""
        closure: set[int] = set()
        for node in nodes:
            while node != -1 and node not in closure:
                closure.add(node)
                node = self.parents[node]
        return sorted(closure)


class _BatchBuilder:
    def __init__(self, roots: list[int], max_nodes: list[int], max_depths: list[int]) -> None:
        self.growing = [_GrowingTree([root]) for root in roots]
        self.max_nodes = max_nodes  # draft nodes allowed per sequence (root not counted)
        self.max_depths = max_depths
        self.level = 0
        self._frontier: list[list[int]] = [[0] if m > 0 and d > 0 else [] for m, d in zip(max_nodes, max_depths)]

    def frontier(self) -> list[list[int]]:
        """Per sequence, the nodes whose candidates the next ``extend`` needs (empty: done)."""
        return self._frontier

    def needed_nodes(self, seq: int) -> list[int]:
        """The nodes a drafter must run to score this sequence's frontier: root-to-frontier paths."""
        return self.growing[seq].path_closure(self._frontier[seq])

    def tree_of(self, seq: int, nodes: list[int]) -> TokenTree:
        return self.growing[seq].subtree(nodes)

    def ranked(self, seq: int) -> list[int]:
        """Draft nodes of one sequence, most probable first (ties: shallower, then older).

        Every prefix of this order is ancestor-closed: a child's path probability never
        exceeds its parent's, and on a tie the parent is shallower."""
        grow = self.growing[seq]
        return sorted(range(1, len(grow.token_ids)), key=lambda i: (-grow.path_probs[i], grow.depths[i], i))

    def path_probs(self) -> list[list[float]]:
        """Per sequence, the path probabilities of its draft nodes, most probable first."""
        return [[self.growing[s].path_probs[i] for i in self.ranked(s)] for s in range(len(self.growing))]

    def trees(self, num_nodes: list[int] | None = None) -> list[TokenTree]:
        """Per sequence the tree of its ``num_nodes[s]`` most probable draft nodes (default:
        every node, up to its max_nodes)."""
        counts = num_nodes or self.max_nodes
        return [self.growing[s].subtree(self.ranked(s)[: counts[s]]) for s in range(len(self.growing))]


class StaticTreeBuilder(_BatchBuilder):
    """SpecInfer's expansion-based tree: every node at depth d gets the top ``widths[d]``
    candidates as children, creation stopping at ``max_nodes`` draft nodes or ``max_depth``."""

    def __init__(self, roots: list[int], widths: tuple[int, ...], max_nodes: list[int], max_depths: list[int]) -> None:
        super().__init__(roots, max_nodes, max_depths)
        self.widths = widths

    def extend(self, candidates: list[list[Candidates]]) -> None:
        """candidates[s][i]: top candidates of frontier node i of sequence s."""
        width = self.widths[self.level] if self.level < len(self.widths) else 0
        next_frontier: list[list[int]] = []
        for seq, (grow, nodes) in enumerate(zip(self.growing, self._frontier)):
            new_nodes: list[int] = []
            for node, options in zip(nodes, candidates[seq]):
                for token_id, prob in options[:width]:
                    if len(grow.token_ids) - 1 >= self.max_nodes[seq]:
                        break
                    new_nodes.append(grow.add(node, token_id, prob))
            done = self.level + 1 >= min(self.max_depths[seq], len(self.widths))
            next_frontier.append([] if done else new_nodes)
        self._frontier = next_frontier
        self.level += 1



class DynamicTreeBuilder(_BatchBuilder):
    """EAGLE-2's dynamic tree: each level expands the ``top_k`` nodes of the newest level with
    the highest path probability, ``top_k`` children each; the final tree keeps the
    ``max_nodes`` draft nodes of highest path probability over all levels.

    The kept set is ancestor-closed: a child's path probability never exceeds its parent's,
    and ties are broken towards smaller depth, so a kept node's parent ranks before it.
    """

    def __init__(self, roots: list[int], top_k: int, max_nodes: list[int], max_depths: list[int]) -> None:
        super().__init__(roots, max_nodes, max_depths)
        self.top_k = top_k

    def extend(self, candidates: list[list[Candidates]]) -> None:
        next_frontier: list[list[int]] = []
        for seq, (grow, nodes) in enumerate(zip(self.growing, self._frontier)):
            new_nodes = self._add_children(grow, nodes, candidates[seq])
            new_nodes.sort(key=lambda i: (-grow.path_probs[i], i))
            done = self.level + 1 >= self.max_depths[seq]
            next_frontier.append([] if done else sorted(new_nodes[: self.top_k]))
        self._frontier = next_frontier
        self.level += 1

    def _add_children(self, grow: _GrowingTree, nodes: list[int], candidates: list[Candidates]) -> list[int]:
        """Each frontier node's ``top_k`` best candidates as its children; the new nodes in order."""
        return [grow.add(node, token_id, prob)
                for node, options in zip(nodes, candidates) for token_id, prob in options[: self.top_k]]


class ChainTreeBuilder(DynamicTreeBuilder):
    """The draft's greedy chain with side leaves: each level adds the ``top_k`` candidates of the
    chain's newest node as its children and follows only the first (the draft's top-1); the
    final tree keeps the ``max_nodes`` draft nodes of highest path probability (ancestor-closed,
    as in ``DynamicTreeBuilder``). The frontier is always one node, the chain's end, so a
    drafter can run the whole chain without reading the candidates back between levels."""

    def extend(self, candidates: list[list[Candidates]]) -> None:
        next_frontier: list[list[int]] = []
        for seq, (grow, nodes) in enumerate(zip(self.growing, self._frontier)):
            new_nodes = self._add_children(grow, nodes, candidates[seq])
            done = self.level + 1 >= self.max_depths[seq] or not new_nodes
            next_frontier.append([] if done else new_nodes[:1])
        self._frontier = next_frontier
        self.level += 1


def best_num_nodes(path_probs: list[float], step_cost: list[float]) -> int:
    """Sequoia-like budget: the number of draft nodes n maximising expected tokens per second.

    path_probs  the draft nodes' path probabilities, most probable first (expected accepted
                drafts of the best n nodes ~ sum of the first n)
    step_cost   step_cost[n]: measured seconds of one step verifying a tree of n draft nodes
                (len(step_cost) - 1 is the largest n allowed)
    """
    best_n, best_rate, expected = 0, 1.0 / step_cost[0], 1.0
    for n in range(1, min(len(path_probs), len(step_cost) - 1) + 1):
        expected += path_probs[n - 1]
        rate = expected / step_cost[n]
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


def merge_trees(trees: list[TokenTree], max_nodes: int, rule: str = "max") -> TokenTree:
    """One tree from several drafters' trees of the same root, identical paths deduplicated,
    at most ``max_nodes`` draft nodes.

    When every tree that drafts anything carries ``node_scores``, the merge keeps the
    ``max_nodes`` nodes of highest score, a node shared by several trees scoring by ``rule``
    (``merge_by_score``). Otherwise paths are taken round-robin, each tree's in node order."""
    if not trees:
        raise ValueError("nothing to merge")
    root = trees[0].token_ids[0]
    if any(tree.token_ids[0] != root for tree in trees):
        raise ValueError("merged trees must share their root")
    drafting = [tree for tree in trees if tree.num_nodes > 1]
    if drafting and all(tree.node_scores is not None for tree in drafting):
        return merge_by_score(drafting, max_nodes, rule)
    per_tree = [[[tree.token_ids[i] for i in path[1:]] for path in tree.paths()] for tree in trees]
    interleaved = [paths[k] for k in range(max(map(len, per_tree))) for paths in per_tree if k < len(paths)]
    return tree_from_paths_within_budget(root, [p for p in interleaved if p], max_nodes)


def merge_by_score(trees: list[TokenTree], max_nodes: int, rule: str = "max") -> TokenTree:
    """The union of scored trees of one root (a node is its token path), cut to the
    ``max_nodes`` best draft nodes (ties: shallower, then first seen). A node several trees
    hold scores, by ``rule``, "max": the best any tree gives it; "noisy_or": 1 - prod(1 - s)
    over the trees' scores s (drafters that agree on a node make it likelier).

    The kept set is ancestor-closed: within a tree a node's score is capped at its parent's
    (a NaN counts as 0), and both rules are monotone in every tree's score while a node's
    parent lies in every tree the node does, so a merged score never exceeds the parent's
    either; a tie goes to the shallower node."""
    if rule not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {rule!r}: {' or '.join(MERGE_RULES)}")
    score: dict[tuple[int, ...], float] = {}
    for tree in trees:
        capped: list[float] = []
        own_best: dict[tuple[int, ...], float] = {}  # a token path twice in one tree counts once
        for i, (key, parent) in enumerate(zip(tree.token_paths(), tree.parents)):
            own = 0.0 if math.isnan(tree.node_scores[i]) else min(1.0, max(0.0, tree.node_scores[i]))
            capped.append(own if parent == -1 else min(own, capped[parent]))
            own_best[key] = max(own_best.get(key, 0.0), capped[i])
        for key, value in own_best.items():
            if key not in score:
                score[key] = value
            elif rule == "max":
                score[key] = max(score[key], value)
            else:
                score[key] = 1.0 - (1.0 - score[key]) * (1.0 - value)
    ranked = sorted((key for key in score if key), key=lambda key: (-score[key], len(key)))[:max_nodes]
    inner = {key[:-1] for key in ranked}
    leaves = [key for key in ranked if key not in inner]  # best first: the best path gets the first nodes
    merged = TokenTree.from_paths(trees[0].token_ids[0], [list(key) for key in leaves])
    scores = {(): 1.0} | {key: score[key] for key in ranked}
    return TokenTree(merged.token_ids, merged.parents,
                     node_scores=tuple(scores[key] for key in merged.token_paths()))


def tree_from_paths_within_budget(root: int, paths: list[list[int]], max_nodes: int) -> TokenTree:
    """Add root-excluded token paths in order (shared prefixes shared), cutting the last one so
    the tree holds at most ``max_nodes`` draft nodes. A path adds the nodes past its longest
    prefix already in the tree (a trie of the kept paths counts them)."""
    kept: list[list[int]] = []
    trie: dict[int, dict] = {}  # token -> children, the kept paths' nodes
    num_nodes = 0
    for path in paths:
        node, shared = trie, 0
        while shared < len(path) and path[shared] in node:
            node = node[path[shared]]
            shared += 1
        room = max_nodes - num_nodes
        if len(path) - shared > room:
            if shared + room > 0:
                kept.append(path[: shared + room])
            break
        for token in path[shared:]:
            node = node.setdefault(token, {})
        num_nodes += len(path) - shared
        kept.append(path)
    return TokenTree.from_paths(root, kept)
