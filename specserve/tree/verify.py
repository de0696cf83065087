"""Verification: which guesses of a token tree the target accepts, and the bonus token.

The target ran one forward over the tree; its row u is the distribution of the token that
FOLLOWS node u's token. Verification walks down from the root (always accepted: it is the last
committed token) and stops where the target disagrees; the target's own token there is the
bonus, so a step commits ``num_accepted_drafts + 1`` new tokens::

    accepted_nodes   (0, a1, ..., ak)            a root path: each node the parent of the next
    new tokens       token_ids[a1], ..., token_ids[ak], bonus_token

Greedy verification follows the target's argmax. Sampled verification is SpecInfer's multi-step
speculative sampling (MSS, Miao et al. ASPLOS'24, Algorithm 2): it emits tokens distributed
exactly as the target's, under the precondition stated on `verify_mss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from specserve.tree.token_tree import TokenTree

# Below this mass, an MSS residual max(0, p - q) is float noise and p == q; see
# `_residual_after_rejection`.
_MIN_RESIDUAL_MASS = 1e-6


@dataclass(frozen=True)
class VerifyResult:
    """One tree's verdict. Invariant: ``accepted_nodes`` is a root path starting with node 0."""

    accepted_nodes: tuple[int, ...]  # [num_accepted_drafts + 1] node indices, root first
    bonus_token: int  # the target's token after the last accepted node

    def __post_init__(self) -> None:
        if not self.accepted_nodes or self.accepted_nodes[0] != 0:
            raise ValueError("accepted_nodes must start with the root, node 0")

    @property
    def num_accepted_drafts(self) -> int:
        return len(self.accepted_nodes) - 1

    def accepted_token_ids(self, tree: TokenTree) -> tuple[int, ...]:
        """This step's new tokens: the accepted guesses' tokens, then the bonus token."""
        drafts = tuple(tree.token_ids[node] for node in self.accepted_nodes[1:])
        return (*drafts, self.bonus_token)


# ---------------------------------------------------------------------------------------------
# Greedy


def verify_greedy(tree: TokenTree, target_argmax: list[int] | torch.Tensor) -> VerifyResult:
    """Follow the target's argmax down the tree.

    ``target_argmax`` [num_nodes]: the target's argmax after each node. Of children that share
    a token, the lowest-indexed one is taken (its subtree is the one explored).
    """
    argmax = target_argmax.tolist() if isinstance(target_argmax, torch.Tensor) else target_argmax
    if len(argmax) != tree.num_nodes:
        raise ValueError(
            f"target_argmax has {len(argmax)} entries for a {tree.num_nodes}-node tree"
        )
    return _walk_greedy(tree, argmax)


def verify_greedy_batch(
    trees: Sequence[TokenTree], target_argmax: list[int] | torch.Tensor
) -> list[VerifyResult]:
    """`verify_greedy` on each tree, with one host transfer for the whole batch.

    ``target_argmax`` [sum of num_nodes]: the trees' rows concatenated in tree order; tree b owns
    rows ``cu_num_nodes[b] : cu_num_nodes[b + 1]``.
    """
    argmax = target_argmax.tolist() if isinstance(target_argmax, torch.Tensor) else target_argmax
    num_rows = sum(tree.num_nodes for tree in trees)
    if len(argmax) != num_rows:
        raise ValueError(f"target_argmax has {len(argmax)} rows for trees of {num_rows} nodes")
    results = []
    start = 0
    for tree in trees:
        results.append(_walk_greedy(tree, argmax[start : start + tree.num_nodes]))
        start += tree.num_nodes
    return results


def _walk_greedy(tree: TokenTree, argmax: list[int]) -> VerifyResult:
    children = tree.children()
    path = [0]
    while True:
        node = path[-1]
        # Accept the first child whose token is the target's argmax; none matches -> stop, and
        # the argmax itself is the bonus token.
        match = next((c for c in children[node] if tree.token_ids[c] == argmax[node]), None)
        if match is None:
            return VerifyResult(tuple(path), int(argmax[node]))
        path.append(match)


# ---------------------------------------------------------------------------------------------
# Multi-step speculative sampling


def verify_mss(
    tree: TokenTree, target_probs: torch.Tensor, generator: torch.Generator | None = None
) -> VerifyResult:
    """SpecInfer's multi-step speculative sampling on one tree.

    ``target_probs`` [num_nodes, vocab]: the target's processed distribution after each node:
    every sampling control applied, history-dependent ones (penalties) with the counts of that
    node's own path (``engine.token_counts``), so row u is exactly plain sampling's law after u. Each guess c is checked against its proposal q_c:
    ``tree.draft_probs[c]``, or a point mass on c's token when the tree has no draft_probs or
    row c is all zeros (the mark of a deterministic guess in a sampled tree).

    Exactness: the new tokens are distributed exactly as the target would sample them, provided
    that each child's token is either a fixed guess (point mass; duplicates among fixed siblings
    are fine: a rejected point mass removes its token from p) or was drawn from its row q_c given
    its ancestors, independently of its siblings (i.i.d. for siblings sharing a q). Siblings drawn
    WITHOUT replacement, or rows that are not the law a token was drawn from, break exactness.
    Each row q_c must give c's own token positive probability (ValueError otherwise).

    All randomness comes from ``generator`` (on target_probs' device): a fixed seed gives a
    fixed result, the same as this tree's in `verify_mss_batch` with the same generator.
    """
    return verify_mss_batch([tree], target_probs, generator)[0]


def verify_mss_batch(
    trees: Sequence[TokenTree],
    target_probs: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
) -> list[VerifyResult]:
    """`verify_mss` on every tree at once: one vectorised round per tried guess.

    ``target_probs`` [sum of num_nodes, vocab]: the trees' rows concatenated in tree order.
    ``generator``: one for the batch, or one per tree (per-request seeds), in which case tree b's
    result equals ``verify_mss(trees[b], ..., generator[b])``. Each tree draws exactly
    ``num_nodes`` uniforms: uniform c decides guess c, uniform 0 (the root is never a guess)
    samples the bonus token.
    """
    if not trees:
        return []
    device = target_probs.device
    flat = _flatten(trees, device)
    if target_probs.dim() != 2 or target_probs.shape[0] != flat.num_nodes:
        raise ValueError(
            f"target_probs is {tuple(target_probs.shape)}; "
            f"expected [{flat.num_nodes}, vocab_size], one row per node"
        )
    num_trees, vocab_size = len(trees), target_probs.shape[1]
    if flat.draft_probs is not None and flat.draft_probs.shape[1] != vocab_size:
        raise ValueError("draft_probs and target_probs must share the vocabulary size")
    uniforms = _draw_uniforms(trees, generator, device)  # [num_nodes]

    rows = torch.arange(num_trees, device=device)
    node = flat.roots.clone()  # [num_trees] the last accepted node
    guess = flat.first_child[node]  # [num_trees] the child being tried, -1 when none is left
    residual = target_probs[node].float()  # [num_trees, vocab] p: what the target still allows
    while bool((guess >= 0).any()):  # at most max(num_nodes) - 1 rounds, one host sync each
        trying = guess >= 0
        child = guess.clamp(min=0)
        token = flat.token_ids[child]
        q = _proposal(flat, child, token, vocab_size)  # [num_trees, vocab]
        p_x, q_x = residual[rows, token], q[rows, token]
        # Accept guess c iff r <= min(1, p(x_c) / q_c(x_c)), r ~ U(0, 1). Written as r * q < p:
        # the same law, and p(x_c) == 0 is always rejected.
        accept = trying & (uniforms[child] * q_x < p_x)
        reject = trying & ~accept
        # Accepted: move to c; the target's distribution after c becomes p.
        # Rejected: p := normalize(max(0, p - q_c)), then try c's next sibling.
        residual = torch.where(
            accept[:, None],
            target_probs[child].float(),
            torch.where(reject[:, None], _residual_after_rejection(residual, q), residual),
        )
        node = torch.where(accept, child, node)
        guess = torch.where(
            accept, flat.first_child[child], torch.where(reject, flat.next_sibling[child], guess)
        )
    # Every child of the last accepted node rejected (or it is a leaf): the bonus ~ p.
    bonus = _sample_rows(residual, uniforms[flat.roots])

    last_nodes = (node - flat.roots).tolist()
    return [
        VerifyResult(tuple(tree.path_to(last)), bonus_token)
        for tree, last, bonus_token in zip(trees, last_nodes, bonus.tolist())
    ]


def _residual_after_rejection(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise normalize(max(0, p - q)): the target's law given that a guess from q was rejected.

    Zero residual: sum(max(0, p - q)) = 1 - sum(min(p, q)) is 0 only when p == q, and then
    p(x)/q(x) = 1 for every token a guess can carry, so a rejection has probability 0. Float
    noise can still reject (p(x) a hair below q(x)) and leave a residual of noise; such a row
    keeps p itself, which makes the next sibling and the bonus exact for p. The error is bounded
    by the probability of that rejection, below _MIN_RESIDUAL_MASS.
    """
    residual = (p - q).clamp_(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(mass > _MIN_RESIDUAL_MASS, residual / mass.clamp(min=_MIN_RESIDUAL_MASS), p)


def _sample_rows(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """[rows] inverse-CDF samples from the rows of ``probs`` [rows, vocab] (need not sum to 1).

    In float64, u * total < total for every float32 u < 1, so a token of probability 0 is never
    returned for a row with positive mass.
    """
    cdf = probs.double().cumsum(dim=-1)
    threshold = uniforms.double()[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, threshold, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


@dataclass(frozen=True)
class _FlatTrees:
    """A batch of trees as global-index tensors (node g of the batch = tree-local node + offset)."""

    num_nodes: int
    roots: torch.Tensor  # [num_trees] global index of each tree's root (its cu_num_nodes offset)
    token_ids: torch.Tensor  # [num_nodes]
    first_child: torch.Tensor  # [num_nodes] lowest-indexed child, -1 for a leaf
    next_sibling: torch.Tensor  # [num_nodes] next child of the same parent, -1 for the last
    point_mass: torch.Tensor  # [num_nodes] bool: the guess is deterministic
    draft_probs: torch.Tensor | None  # [num_nodes, vocab] proposal rows; None: all point masses


def _flatten(trees: Sequence[TokenTree], device: torch.device) -> _FlatTrees:
    """Concatenate ``trees`` (built on the CPU from the host-side tuples, then moved once)."""
    num_nodes_per_tree = torch.tensor([tree.num_nodes for tree in trees], dtype=torch.long)
    roots = num_nodes_per_tree.cumsum(0) - num_nodes_per_tree
    token_ids = torch.tensor(
        list(chain.from_iterable(tree.token_ids for tree in trees)), dtype=torch.long
    )
    local_parents = torch.tensor(
        list(chain.from_iterable(tree.parents for tree in trees)), dtype=torch.long
    )
    offsets = roots.repeat_interleave(num_nodes_per_tree)
    parents = torch.where(local_parents >= 0, local_parents + offsets, -1)  # [num_nodes] global
    first_child, next_sibling = _child_links(parents)
    roots, token_ids, first_child, next_sibling = (
        t.to(device) for t in (roots, token_ids, first_child, next_sibling)
    )
    num_nodes = token_ids.shape[0]

    draft_probs = None
    point_mass = torch.ones(num_nodes, dtype=torch.bool, device=device)
    if any(tree.draft_probs is not None for tree in trees):
        some_rows = next(tree.draft_probs for tree in trees if tree.draft_probs is not None)
        draft_probs = torch.cat(
            [
                tree.draft_probs
                if tree.draft_probs is not None
                else some_rows.new_zeros(tree.num_nodes, some_rows.shape[1])
                for tree in trees
            ]
        ).to(device, torch.float32)
        point_mass = draft_probs.sum(dim=-1) == 0
        own = draft_probs.gather(1, token_ids[:, None]).squeeze(1)
        is_guess = torch.ones_like(point_mass)
        is_guess[roots] = False
        bad = is_guess & ~point_mass & ~(own > 0)
        if bool(bad.any()):
            raise ValueError(
                f"node {int(bad.nonzero()[0])} (batch index) has probability 0 under "
                "its own draft_probs row; give a deterministic guess an all-zero row"
            )
    return _FlatTrees(
        num_nodes, roots, token_ids, first_child, next_sibling, point_mass, draft_probs
    )


def _child_links(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Children as linked lists: (first_child, next_sibling), each [num_nodes], -1 for none.

    ``parents`` [num_nodes]: global parent indices, -1 for roots. Siblings are linked in
    increasing index order, as `TokenTree.children` lists them.
    """
    first_child = torch.full_like(parents, -1)
    next_sibling = torch.full_like(parents, -1)
    children = (parents >= 0).nonzero().squeeze(1)  # increasing index
    children = children[parents[children].sort(stable=True).indices]  # grouped by parent
    child_parents = parents[children]
    same_parent = child_parents[1:] == child_parents[:-1]
    next_sibling[children[:-1][same_parent]] = children[1:][same_parent]
    is_first = torch.ones_like(child_parents, dtype=torch.bool)
    is_first[1:] = ~same_parent
    first_child[child_parents[is_first]] = children[is_first]
    return first_child, next_sibling


def _proposal(
    flat: _FlatTrees, child: torch.Tensor, token: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """[num_trees, vocab] q_c for each tree's current guess: its draft row, or a point mass."""
    one_hot = torch.nn.functional.one_hot(token, vocab_size).float()
    if flat.draft_probs is None:
        return one_hot
    return torch.where(flat.point_mass[child][:, None], one_hot, flat.draft_probs[child])


def _draw_uniforms(
    trees: Sequence[TokenTree],
    generator: torch.Generator | Sequence[torch.Generator | None] | None,
    device: torch.device,
) -> torch.Tensor:
    """[num_nodes] U(0, 1), one per node of the batch (tree by tree for per-tree generators)."""
    if generator is None or isinstance(generator, torch.Generator):
        num_nodes = sum(tree.num_nodes for tree in trees)
        return torch.rand(num_nodes, generator=generator, device=device)
    if len(generator) != len(trees):
        raise ValueError(f"{len(generator)} generators for {len(trees)} trees; pass one per tree")
    return torch.cat(
        [
            torch.rand(tree.num_nodes, generator=gen, device=device)
            for tree, gen in zip(trees, generator)
        ]
    )
