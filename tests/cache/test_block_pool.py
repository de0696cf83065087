import pytest

from specserve.cache.block_pool import BlockPool, hash_block_tokens


def test_allocate_hands_out_lowest_ids_first_and_counts_refs():
    pool = BlockPool(4)
    assert [pool.allocate() for _ in range(3)] == [0, 1, 2]
    assert pool.ref_counts == [1, 1, 1, 0]
    assert pool.num_free_blocks == 1
    assert pool.usage == 0.75
    pool.check_invariants()


def test_exhausted_pool_raises():
    pool = BlockPool(1)
    pool.allocate()
    with pytest.raises(MemoryError):
        pool.allocate()


def test_free_returns_to_tail_of_queue_least_recently_freed_first():
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.free(b)
    pool.free(a)
    assert list(pool.free_queue) == [b, a]
    assert pool.allocate() == b
    assert pool.allocate() == a
    pool.free(c)
    pool.check_invariants()


def test_share_and_free_count_references():
    pool = BlockPool(2)
    block = pool.allocate()
    pool.share(block)
    assert pool.ref_counts[block] == 2
    pool.free(block)
    assert pool.ref_counts[block] == 1 and block not in pool.free_queue
    pool.free(block)
    assert pool.ref_counts[block] == 0 and block in pool.free_queue
    with pytest.raises(ValueError):
        pool.free(block)


def test_cached_block_survives_free_and_is_revived_by_share():
    pool = BlockPool(3)
    block = pool.allocate()
    h = hash_block_tokens(None, [1, 2, 3, 4])
    pool.register(block, h)
    pool.free(block)
    assert pool.lookup(h) == block  # still findable while free
    pool.share(block)
    assert pool.ref_counts[block] == 1 and block not in pool.free_queue
    assert (pool.num_prefix_queries, pool.num_prefix_hits) == (1, 1)
    pool.check_invariants()


def test_reallocation_evicts_the_hash():
    pool = BlockPool(1)
    block = pool.allocate()
    h = hash_block_tokens(None, [7, 7])
    pool.register(block, h)
    pool.free(block)
    assert pool.allocate() == block
    assert pool.lookup(h) is None
    assert pool.block_hashes[block] is None


def test_hash_chain_depends_on_every_earlier_token():
    first = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(first, [3, 4]) != hash_block_tokens(hash_block_tokens(None, [1, 5]), [3, 4])
    assert hash_block_tokens(first, [3, 4]) == hash_block_tokens(hash_block_tokens(None, [1, 2]), [3, 4])
    assert hash_block_tokens(None, [3, 4]) != hash_block_tokens(first, [3, 4])
