"""The one drafter interface: running sequences and a budget in, one token tree per sequence out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from specserve.tree import TokenTree

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DraftRequest:
    seq_id: str
    token_ids: Sequence[int]  # the whole sequence; its last token is the tree's root
    max_tree_tokens: int  # draft nodes allowed, root not counted (>= 0)
    max_depth: int  # longest draft path allowed (>= 0)
    drafters: tuple[str, ...] | None = None  # a merged drafter's members allowed to propose; None: all
    own_context_only: bool = False  # draft from this sequence alone (no text of other requests)


class Drafter(Protocol):
    needs_target_states: bool  # whether ``observe`` wants the target's hidden states

    def propose(self, requests: list[DraftRequest]) -> list[TokenTree]:
        """One tree per request, rooted at its last token, within its budget."""
        ...

    def commit(self, seq_id: str, num_committed: int) -> None:
        """The target committed ``num_committed`` tokens of this sequence: roll own state back to them."""
        ...

    def observe(self, seq_id: str, first_position: int, states: torch.Tensor) -> None:
        """states [n, hidden]: the target's final-norm hidden states of this sequence's tokens at
        positions first_position .. + n - 1, just committed (called only if needs_target_states)."""
        ...

    def release(self, seq_id: str) -> None:
        """The sequence is gone: free everything kept for it."""
        ...
