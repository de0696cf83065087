"""Token trees: the typed tree object, its pure functions, and verification (greedy and MSS)."""

from specserve.tree.token_tree import TokenTree
from specserve.tree.verify import (
    VerifyResult,
    verify_greedy,
    verify_greedy_batch,
    verify_mss,
    verify_mss_batch,
)

__all__ = [
    "TokenTree",
    "VerifyResult",
    "verify_greedy",
    "verify_greedy_batch",
    "verify_mss",
    "verify_mss_batch",
]
