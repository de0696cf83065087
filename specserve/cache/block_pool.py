"""A pool of fixed-size KV blocks: reference counts, a free list, and a prefix cache of full blocks.

Invariants (checked by ``check_invariants`` in tests):
- every block id is in exactly one state: in use (ref_count >= 1) or free (ref_count == 0, in
  the free queue);
- a block with a hash holds exactly the committed tokens that hash names, and ``cached_blocks``
  maps that hash to it; a free block may keep its hash (an evictable prefix-cache entry) until
  it is handed out again, which drops the hash;
- hashes are only ever given to *full* blocks of *committed* tokens (see ``KVCacheManager``).

The free queue is least-recently-freed first, so freed cached blocks survive as long as possible.
No torch here: the pool only does bookkeeping of ids.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


def hash_block_tokens(parent_hash: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """Hash chain over full blocks: a block's hash names its tokens *and* every token before it."""
    digest = hashlib.sha256(parent_hash or b"\x00" * 32)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("a block pool needs at least one block")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached_blocks: dict[bytes, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0.0 .. 1.0)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self) -> int:
        """Hand out the least recently freed block with ref_count 1; it loses any cached hash."""
        if not self.free_queue:
            raise MemoryError("the KV block pool is exhausted")
        block_id, _ = self.free_queue.popitem(last=False)
        self._drop_hash(block_id)
        self.ref_counts[block_id] = 1
        return block_id

    def share(self, block_id: int) -> None:
        """One more user of a block (a prefix hit or a forked sequence); revives a freed cached block."""
        if self.ref_counts[block_id] == 0:
            del self.free_queue[block_id]
        self.ref_counts[block_id] += 1

    def free(self, block_id: int) -> None:
        """One user fewer; at zero the block joins the free queue's tail, keeping its hash."""
        if self.ref_counts[block_id] <= 0:
            raise ValueError(f"block {block_id} freed more times than it was used")
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_queue[block_id] = None

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding these committed tokens, if cached (in use or free)."""
        self.num_prefix_queries += 1
        block_id = self.cached_blocks.get(block_hash)
        if block_id is not None:
            self.num_prefix_hits += 1
        return block_id

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Mark a full block of committed tokens as reusable prefix (first block wins a tie)."""
        if self.block_hashes[block_id] is not None:
            return
        self.block_hashes[block_id] = block_hash
        self.cached_blocks.setdefault(block_hash, block_id)

    def is_cached(self, block_id: int) -> bool:
        return self.block_hashes[block_id] is not None

    def uncache(self, block_id: int) -> None:
        """Forget a block's hash before its contents change (only its sole user may do this)."""
        self._drop_hash(block_id)

    def _drop_hash(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is not None:
            self.block_hashes[block_id] = None
            if self.cached_blocks.get(block_hash) == block_id:
                del self.cached_blocks[block_hash]

    def check_invariants(self) -> None:
        for block_id, count in enumerate(self.ref_counts):
            assert count >= 0, f"block {block_id} has ref count {count}"
            assert (count == 0) == (block_id in self.free_queue), f"block {block_id} misfiled"
        for block_hash, block_id in self.cached_blocks.items():
            assert self.block_hashes[block_id] == block_hash
