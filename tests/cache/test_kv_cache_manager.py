import random

import pytest
import torch

from specserve.cache.kv_cache import KVCache
from specserve.cache.kv_cache_manager import KVCacheManager, NoFreeBlocks


def committed_prompt(manager: KVCacheManager, seq_id: str, tokens: list[int]) -> int:
    """Admit, allocate and commit a whole prompt as the engine does; returns the prefix hit."""
    hit = manager.add_sequence(seq_id, tokens)
    manager.allocate_slots(seq_id, hit, len(tokens) - hit)
    manager.register_committed(seq_id, tokens, len(tokens))
    return hit


def test_slots_follow_the_block_table():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    assert manager.add_sequence("a", list(range(10))) == 0
    assert manager.allocate_slots("a", 0, 10) == []
    assert manager.block_table("a") == [0, 1, 2]
    assert [manager.slot("a", p) for p in (0, 3, 4, 9)] == [0, 3, 4, 9]
    manager.block_tables["a"] = [5, 2, 7]
    assert [manager.slot("a", p) for p in (0, 3, 4, 9)] == [20, 23, 8, 29]


def test_prefix_hit_shares_full_blocks_only():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    committed_prompt(manager, "a", prompt)
    assert manager.block_table("a") == [0, 1, 2]
    # same first 9 tokens, different tail: both full blocks are hits
    hit = manager.add_sequence("b", prompt[:9] + [999])
    assert hit == 8
    assert manager.block_table("b") == [0, 1]
    assert manager.pool.ref_counts[:3] == [2, 2, 1]
    manager.allocate_slots("b", 8, 2)
    assert manager.block_table("b") == [0, 1, 3]
    assert manager.pool.num_prefix_hits == 2


def test_fully_cached_prompt_recomputes_last_token_with_copy_on_write():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    committed_prompt(manager, "a", prompt)
    hit = manager.add_sequence("b", prompt)
    assert hit == 7  # the last token must be computed again for its logits
    copies = manager.allocate_slots("b", 7, 1)
    assert copies == [(1, 2)]  # block 1 is shared with "a": b writes into a private copy
    assert manager.block_table("b") == [0, 2]
    assert manager.pool.ref_counts[:3] == [2, 1, 1]


def test_sole_user_of_cached_block_uncaches_instead_of_copying():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    committed_prompt(manager, "a", prompt)
    manager.free("a")
    hit = manager.add_sequence("b", prompt)
    assert hit == 7 and manager.block_table("b") == [0, 1]
    assert manager.allocate_slots("b", 7, 1) == []
    assert not manager.pool.is_cached(1)
    assert manager.pool.is_cached(0)


def test_only_committed_full_blocks_are_registered():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    manager.add_sequence("a", [1, 2, 3, 4, 5, 6])
    manager.allocate_slots("a", 0, 6 + 5)  # prompt plus a 5-node tree
    manager.register_committed("a", [1, 2, 3, 4, 5, 6], 6)
    assert [manager.pool.is_cached(b) for b in manager.block_table("a")] == [True, False, False]


def test_commit_path_moves_accepted_nodes_depth_first_and_trim_frees_the_rest():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    manager.add_sequence("a", [0] * 3)
    manager.allocate_slots("a", 0, 3)
    # prefix of 3, a 7-node tree at positions 3..9; accepted path: nodes 0, 2, 5
    manager.allocate_slots("a", 3, 7)
    assert manager.block_table("a") == [0, 1, 2]
    src, dst = manager.commit_path("a", 3, [0, 2, 5])
    assert (src, dst) == ([5, 8], [4, 5])
    manager.trim("a", 3 + 3)
    assert manager.block_table("a") == [0, 1]
    assert manager.pool.ref_counts[:3] == [1, 1, 0]


def test_allocation_failure_changes_nothing():
    manager = KVCacheManager(num_blocks=2, block_size=4)
    manager.add_sequence("a", [1] * 5)
    with pytest.raises(NoFreeBlocks):
        manager.allocate_slots("a", 0, 9)
    assert manager.block_table("a") == []
    assert manager.pool.num_free_blocks == 2


def test_fork_shares_then_copies_on_write():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    committed_prompt(manager, "a", [1, 2, 3, 4, 5, 6])
    manager.fork("a", "b")
    assert manager.pool.ref_counts[:2] == [2, 2]
    copies = manager.allocate_slots("b", 6, 1)
    assert copies == [(1, 2)] and manager.block_table("b") == [0, 2]
    assert manager.block_table("a") == [0, 1]


def test_finished_and_aborted_sequences_return_every_block():
    manager = KVCacheManager(num_blocks=16, block_size=4)
    committed_prompt(manager, "a", list(range(9)))
    committed_prompt(manager, "b", list(range(9)) + [50, 51, 52])
    manager.allocate_slots("b", 12, 6)
    manager.free("a")
    manager.free("b")
    assert manager.pool.num_free_blocks == 16
    assert manager.block_tables == {}
    manager.pool.check_invariants()


def test_random_steps_leak_nothing_and_never_write_shared_blocks():
    """Many speculative steps with random acceptance: the pool holds exactly what the committed
    tokens need, and a shared prefix block's bytes never change."""
    rng = random.Random(0)
    block_size, num_blocks = 4, 256
    manager = KVCacheManager(num_blocks, block_size)
    cache = KVCache(2, num_blocks, block_size, 1, 2, torch.float32, torch.device("cpu"))
    shared_prompt = list(range(13))  # 3 full shared blocks + 1 private token
    seqs = {}
    for name in ("a", "b", "c"):
        tokens = list(shared_prompt)
        hit = manager.add_sequence(name, tokens)
        cache.copy_blocks(manager.allocate_slots(name, hit, len(tokens) - hit))
        for pos in range(hit, len(tokens)):
            cache.kv.view(2, 2, -1, 1, 2)[:, :, manager.slot(name, pos)] = float(tokens[pos])
        manager.register_committed(name, tokens, len(tokens))
        seqs[name] = (tokens, len(tokens))
    shared_blocks = manager.block_table("a")[:3]
    assert manager.block_table("b")[:3] == shared_blocks == manager.block_table("c")[:3]
    before = cache.kv[:, :, shared_blocks].clone()
    for _ in range(200):
        name = rng.choice(sorted(seqs))
        tokens, num_computed = seqs[name]
        tree_len = rng.randint(1, 9)
        cache.copy_blocks(manager.allocate_slots(name, num_computed, tree_len))
        for i in range(tree_len):  # the forward writes every tree node's K/V
            cache.kv.view(2, 2, -1, 1, 2)[:, :, manager.slot(name, num_computed + i)] = -1.0
        path = [0]
        while path[-1] + 1 < tree_len and rng.random() < 0.6:
            path.append(rng.randint(path[-1] + 1, tree_len - 1))
        src, dst = manager.commit_path(name, num_computed, path)
        cache.move_slots(src, dst)
        num_computed += len(path)
        tokens += [rng.randint(100, 200) for _ in path]
        manager.trim(name, num_computed)
        manager.register_committed(name, tokens, num_computed)
        seqs[name] = (tokens, num_computed)
        in_use = sum(len(manager.block_table(n)) for n in seqs) - 2 * len(shared_blocks)
        assert manager.pool.num_blocks - manager.pool.num_free_blocks == in_use
        assert all(len(manager.block_table(n)) == -(-c // block_size) for n, (_, c) in seqs.items())
        manager.pool.check_invariants()
    assert torch.equal(cache.kv[:, :, shared_blocks], before)
    for name in seqs:
        manager.free(name)
    assert manager.pool.num_free_blocks == num_blocks
