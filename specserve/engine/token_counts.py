"""What the history-dependent controls read (repetition, frequency and presence penalties).

A request's counts cover its committed tokens. A tree node's row is the target's distribution
of the token AFTER that node, so its penalties must count the tokens on the node's path too
(the root excluded: it is the sequence's last token, already counted)::

    row u's counts = output_counts + occurrences along path(root -> u), root excluded
    row u's prompt = prompt_mask

With the counts of its own path at every node, the processed target distribution at node u is
exactly plain sampling's law after the path, which keeps speculative sampling exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.tree import TokenTree


def path_token_counts(parents: tuple[int, ...], token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """counts[..., u, x]: occurrences of token x on the path from the root to node u, the root
    itself excluded (node u included).

    ``parents`` [num_nodes]: one tree shape; ``token_ids`` [..., num_nodes]: the tokens of one or
    many trees of that shape. Returns float32 [..., num_nodes, vocab_size].
    """
    ancestors = TokenTree(tuple([0] * len(parents)), parents).mask().to(token_ids.device)
    ancestors[:, 0] = False  # [num_nodes, num_nodes] j on the path to i, j != root
    one_hot = torch.nn.functional.one_hot(token_ids.long(), vocab_size).float()  # [..., N, V]
    return ancestors.float() @ one_hot


@dataclass
class TokenCounts:
    """One request's committed history as the penalties read it; updated after every step."""

    output_counts: torch.Tensor  # [vocab] float32: occurrences of each generated token
    prompt_mask: torch.Tensor  # [vocab] bool: the token occurs in the prompt

    @classmethod
    def from_tokens(
        cls, prompt_ids: list[int], generated_ids: list[int], vocab_size: int, device: torch.device
    ) -> TokenCounts:
        prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        prompt_mask[torch.tensor(prompt_ids, dtype=torch.long, device=device)] = True
        counts = cls(torch.zeros(vocab_size, device=device), prompt_mask)
        counts.add(generated_ids)
        return counts

    def add(self, token_ids: list[int]) -> None:
        """Count newly committed generated tokens."""
        if token_ids:
            ids = torch.tensor(token_ids, dtype=torch.long, device=self.output_counts.device)
            self.output_counts.index_add_(0, ids, torch.ones(len(token_ids), device=ids.device))

    def along_tree(self, tree: TokenTree) -> torch.Tensor:
        """[num_nodes, vocab] the output counts each node's row must use (its path added)."""
        if tree.num_nodes == 1:
            return self.output_counts[None]
        ids = torch.tensor(tree.token_ids, dtype=torch.long, device=self.output_counts.device)
        path = path_token_counts(tree.parents, ids, self.output_counts.shape[0])
        return self.output_counts[None] + path
