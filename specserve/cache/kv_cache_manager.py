"""Per-sequence block tables over a shared ``BlockPool``: prefix hits, slots for new tokens,
copy-on-write, depth-first commit of an accepted tree path, and release.

Logical layout of one sequence (block_size 4, ``C`` committed, ``T`` tree slots of this step)::

    position   0 1 2 3 | 4 5 6 7 | 8 9 . .
    block      b0      | b1      | b2
    content    C C C C | C C T T | T T

Invariants:
- positions [0, num_computed) hold committed K/V; a block is shared (ref_count > 1) or cached
  (has a hash) only if every position it holds is committed, so nothing ever writes into it:
  ``allocate_slots`` copies (or, for a sole user, un-caches) such a block before a write;
- after ``commit_path`` + ``trim`` a sequence holds exactly ceil(num_computed / block_size)
  blocks: rejected branches' slots are released with the blocks past the committed tokens;
- only full blocks of committed tokens are registered as prefix (``register_committed``).
"""

from __future__ import annotations

from specserve.cache.block_pool import BlockPool, hash_block_tokens


class NoFreeBlocks(Exception):
    """Raised by ``allocate_slots`` when the pool cannot hold the new tokens; nothing changed."""


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        self.block_hashes: dict[str, list[bytes]] = {}  # hashes of the sequence's registered blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        return self.block_tables[seq_id]

    def slot(self, seq_id: str, position: int) -> int:
        table = self.block_tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def add_sequence(self, seq_id: str, token_ids: list[int]) -> int:
        """Start a sequence, sharing the cached blocks of its longest cached prefix.

        Returns how many tokens are already computed. At least the last token is always left
        to compute (its logits are needed), so a fully cached prompt reports len - 1 and its
        last block is copied on write.
        """
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id} already has blocks")
        table: list[int] = []
        hashes: list[bytes] = []
        if self.enable_prefix_caching:
            parent: bytes | None = None
            for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
                block_hash = hash_block_tokens(parent, token_ids[start : start + self.block_size])
                block_id = self.pool.lookup(block_hash)
                if block_id is None:
                    break
                self.pool.share(block_id)
                table.append(block_id)
                hashes.append(block_hash)
                parent = block_hash
        self.block_tables[seq_id] = table
        self.block_hashes[seq_id] = hashes
        return min(len(table) * self.block_size, len(token_ids) - 1)

    def num_new_blocks_needed(self, seq_id: str, num_computed: int, num_new_tokens: int) -> int:
        """Blocks ``allocate_slots`` would take from the pool (appends plus copies)."""
        table = self.block_tables[seq_id]
        end = num_computed + num_new_tokens
        appended = max(0, self.num_blocks_for(end) - len(table))
        first = num_computed // self.block_size
        copies = sum(
            1 for b in table[first : self.num_blocks_for(end)] if self.pool.ref_counts[b] > 1
        )
        return appended + copies

    def allocate_slots(self, seq_id: str, num_computed: int, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make positions [num_computed, num_computed + num_new_tokens) writable.

        Returns (src_block, dst_block) copies the caller must apply to the KV tensors before
        writing. Raises ``NoFreeBlocks`` (changing nothing) if the pool is too small.
        """
        if self.num_new_blocks_needed(seq_id, num_computed, num_new_tokens) > self.pool.num_free_blocks:
            raise NoFreeBlocks(seq_id)
        table = self.block_tables[seq_id]
        end_block = self.num_blocks_for(num_computed + num_new_tokens)
        copies: list[tuple[int, int]] = []
        for index in range(num_computed // self.block_size, min(end_block, len(table))):
            block_id = table[index]
            if self.pool.ref_counts[block_id] > 1:  # shared: copy on write
                new_id = self.pool.allocate()
                copies.append((block_id, new_id))
                self.pool.free(block_id)
                table[index] = new_id
            elif self.pool.is_cached(block_id):  # sole user of a cached block: it stops being prefix
                self.pool.uncache(block_id)
            if index < len(self.block_hashes[seq_id]):
                del self.block_hashes[seq_id][index:]
        while len(table) < end_block:
            table.append(self.pool.allocate())
        return copies

    def commit_path(self, seq_id: str, prefix_len: int, accepted_nodes: list[int]) -> tuple[list[int], list[int]]:
        """Depth-first commit: node ``accepted_nodes[i]`` of this step's tree moves to position prefix_len + i.

        Returns (src_slots, dst_slots) of the moves the caller applies to every layer's K/V
        (entries that do not move are left out). Safe as one gather-then-scatter: along a
        path node indices grow, so dst <= src and no destination is a later source.
        """
        src_slots, dst_slots = [], []
        for depth, node in enumerate(accepted_nodes):
            if node != depth:
                src_slots.append(self.slot(seq_id, prefix_len + node))
                dst_slots.append(self.slot(seq_id, prefix_len + depth))
        return src_slots, dst_slots

    def trim(self, seq_id: str, num_computed: int) -> None:
        """Release every block past the one holding position num_computed - 1."""
        table = self.block_tables[seq_id]
        keep = self.num_blocks_for(num_computed)
        for block_id in table[keep:]:
            self.pool.free(block_id)
        del table[keep:]

    def register_committed(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        """Offer every full block of committed tokens (positions < num_computed) as prefix."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables[seq_id]
        hashes = self.block_hashes[seq_id]
        num_full = min(num_computed // self.block_size, len(table))
        for index in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            start = index * self.block_size
            block_hash = hash_block_tokens(parent, token_ids[start : start + self.block_size])
            self.pool.register(table[index], block_hash)
            hashes.append(block_hash)

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares every block of the parent (both copy on their next write)."""
        table = list(self.block_tables[parent_id])
        for block_id in table:
            self.pool.share(block_id)
        self.block_tables[child_id] = table
        self.block_hashes[child_id] = list(self.block_hashes[parent_id])

    def free(self, seq_id: str) -> None:
        """Return every block of a finished, aborted or preempted sequence (cached ones stay findable)."""
        for block_id in reversed(self.block_tables.pop(seq_id, [])):
            self.pool.free(block_id)
        self.block_hashes.pop(seq_id, None)
