"""The Triton tree-attention kernel against ``tree_attention_ref`` on fresh random paged inputs.

On the CPU the kernel runs through Triton's interpreter, so the CPU cases are tiny; the cases
marked ``gpu`` use serving-sized shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from specserve_kernels.reference import tree_attention_ref  # noqa: E402
from specserve_kernels.tree_attention import (  # noqa: E402
    LaunchConfig,
    _reduce_splits_kernel,
    _tree_attention_kernel,
    compile_variants,
    launch_tree_attention,
    select_launch_config,
    tree_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GARBAGE = 1000.0  # fills every cache slot no sequence owns; finite, but ruinous if read
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------- random trees (parent lists)
def chain(num_tokens: int, generator: torch.Generator) -> list[int]:
    return list(range(-1, num_tokens - 1))


def star(num_tokens: int, generator: torch.Generator) -> list[int]:
    return [-1] + [0] * (num_tokens - 1)


def random_tree(num_tokens: int, generator: torch.Generator) -> list[int]:
    """Parent uniform among earlier tokens: shallow and bushy."""
    return [
        -1 if i == 0 else int(torch.randint(0, i, (), generator=generator))
        for i in range(num_tokens)
    ]


def deep_tree(num_tokens: int, generator: torch.Generator) -> list[int]:
    """Mostly a chain with occasional branches back up to a recent token: depth ~ 0.8 * size."""
    parents = [-1]
    for i in range(1, num_tokens):
        jump = int(torch.randint(0, 5, (), generator=generator))
        parents.append(
            i - 1 if jump else max(i - 1 - int(torch.randint(1, 8, (), generator=generator)), 0)
        )
    return parents


def wide_tree(num_tokens: int, generator: torch.Generator) -> list[int]:
    """Every token hangs off one of the first three: many siblings, depth <= 4."""
    return [
        -1 if i == 0 else int(torch.randint(0, min(i, 3), (), generator=generator))
        for i in range(num_tokens)
    ]


def forest(num_tokens: int, generator: torch.Generator) -> list[int]:
    """Several roots (parent -1 more than once)."""
    parents = random_tree(num_tokens, generator)
    for i in range(1, num_tokens, 5):
        parents[i] = -1
    return parents


def chain_then_tree(num_tokens: int, generator: torch.Generator) -> list[int]:
    """A chain whose last third branches: the chain fast path must not be taken."""
    split = 2 * num_tokens // 3
    return chain(split, generator) + [
        int(torch.randint(split - 2, i, (), generator=generator)) for i in range(split, num_tokens)
    ]


TREES = {
    f.__name__: f for f in (chain, star, random_tree, deep_tree, wide_tree, forest, chain_then_tree)
}
TREES["single"] = TREES["empty"] = chain  # used with tree_len 1 and 0


# ---------------------------------------------------------------- paged inputs
@dataclasses.dataclass
class PagedInputs:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32
    prefix_lens: torch.Tensor  # [num_seqs] int32
    tree_lens: torch.Tensor  # [num_seqs] int32
    tree_parents: torch.Tensor  # [num_tokens] int32

    def args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.q, self.k_cache, self.v_cache, self.block_tables,
            self.prefix_lens, self.tree_lens, self.tree_parents,
        )  # fmt: skip


def make_paged_inputs(
    seed: int,
    prefix_lens: list[int],
    trees: list[tuple[str, int]],  # (tree kind, tree_len) per sequence
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    spare_table_blocks: int = 1,
) -> PagedInputs:
    """Sequences scattered over a shuffled pool of physical blocks; every unowned slot is garbage.

    Block-table entries past a sequence's last block point at garbage blocks too.
    """
    generator = torch.Generator().manual_seed(seed)
    parents_per_seq = [TREES[kind](tree_len, generator) for kind, tree_len in trees]
    tree_lens = [len(parents) for parents in parents_per_seq]
    blocks_per_seq = [math.ceil((p + t) / block_size) for p, t in zip(prefix_lens, tree_lens)]
    num_garbage_blocks = 3
    num_blocks = sum(blocks_per_seq) + num_garbage_blocks
    physical = torch.randperm(num_blocks, generator=generator).int()
    garbage_blocks = physical[sum(blocks_per_seq) :]
    max_num_blocks = max(blocks_per_seq) + spare_table_blocks
    block_tables = garbage_blocks[
        torch.randint(0, num_garbage_blocks, (len(trees), max_num_blocks), generator=generator)
    ]
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    used = 0
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = physical[used : used + count]
        used += count
        positions = torch.arange(prefix_lens[seq] + tree_lens[seq])
        owned[block_tables[seq, positions // block_size].long(), positions % block_size] = True
    k_cache[~owned] = GARBAGE
    v_cache[~owned] = -GARBAGE
    q = torch.randn(sum(tree_lens), num_heads, head_dim, generator=generator)
    tree_parents = [p for parents in parents_per_seq for p in parents]
    return PagedInputs(
        q.to(DEVICE, dtype),
        k_cache.to(DEVICE, dtype),
        v_cache.to(DEVICE, dtype),
        block_tables.contiguous().to(DEVICE),
        torch.tensor(prefix_lens, dtype=torch.int32, device=DEVICE),
        torch.tensor(tree_lens, dtype=torch.int32, device=DEVICE),
        torch.tensor(tree_parents, dtype=torch.int32, device=DEVICE),
    )


@contextlib.contextmanager
def poisoned_allocations():
    """Every floating tensor from torch.empty / empty_like starts as NaN (output and scratch)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|; NaN anywhere in out gives inf."""
    if not torch.isfinite(out).all():
        return math.inf
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def check_against_reference(inputs: PagedInputs, config: LaunchConfig | None = None) -> None:
    with poisoned_allocations():
        if config is None:
            out = tree_attention(*inputs.args())
        else:
            scale = 1.0 / math.sqrt(inputs.q.shape[-1])
            out = launch_tree_attention(*inputs.args(), scale, config)
    ref = tree_attention_ref(*inputs.args())
    assert out.shape == inputs.q.shape and out.dtype == inputs.q.dtype
    error = relative_error(out, ref)
    assert error < TOLERANCE[inputs.q.dtype], f"relative error {error}"


# ---------------------------------------------------------------- CPU-sized cases
# (seed, prefix_lens, trees, num_heads, num_kv_heads, head_dim, block_size, dtype)
CASES = [
    (0, [5, 0, 23], [("random_tree", 9), ("chain", 6), ("star", 7)], 4, 4, 64, 16, torch.float32),
    (1, [0, 17], [("deep_tree", 40), ("single", 1)], 6, 2, 64, 32, torch.float32),
    (
        2,
        [31, 3, 0, 12],
        [("wide_tree", 12), ("empty", 0), ("chain", 1), ("forest", 11)],
        8,
        2,
        64,
        16,
        torch.float32,
    ),
    (3, [9], [("chain_then_tree", 70)], 3, 1, 64, 16, torch.float32),
    (4, [40, 1], [("random_tree", 17), ("deep_tree", 20)], 4, 1, 128, 32, torch.float32),
    (5, [0, 64], [("chain", 33), ("star", 5)], 6, 2, 128, 16, torch.bfloat16),
    (
        6,
        [18, 7, 0],
        [("forest", 8), ("wide_tree", 6), ("random_tree", 10)],
        8,
        2,
        64,
        32,
        torch.float16,
    ),
    (7, [0], [("single", 1)], 4, 4, 64, 16, torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_matches_reference(case):
    seed, prefix_lens, trees, num_heads, num_kv_heads, head_dim, block_size, dtype = case
    inputs = make_paged_inputs(
        seed, prefix_lens, trees, num_heads, num_kv_heads, head_dim, block_size, dtype
    )
    check_against_reference(inputs)


@pytest.mark.parametrize("num_splits", [2, 8])
@pytest.mark.parametrize("seed", [10, 11])
def test_split_kv_matches_reference(seed, num_splits):
    """Forced splits, with prefixes shorter than one split's chunk (0 and 5) among them."""
    inputs = make_paged_inputs(
        seed, [70, 0, 5, 130], [("random_tree", 5), ("chain", 3), ("single", 1), ("deep_tree", 9)],
        8, 2, 64, 16, torch.float32,
    )  # fmt: skip
    config = LaunchConfig(
        block_m=16, block_q=4, block_n=16, tree_block_n=16, num_splits=num_splits,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    check_against_reference(inputs, config)


def test_split_kv_is_chosen_for_decode_with_long_block_tables():
    """Decode of one sequence: the shape rule picks splits, and the result is still exact."""
    config = select_launch_config(1, 1, 9, 3, 64, 8192, torch.bfloat16, num_sms=132)
    assert config.num_splits > 1
    assert select_launch_config(4096, 16, 32, 8, 128, 8192, torch.bfloat16).num_splits == 1
    inputs = make_paged_inputs(
        12, [300, 0], [("single", 1), ("chain", 2)], 6, 3, 64, 32, torch.float32,
        spare_table_blocks=12,  # capacity 704 positions: enough for the rule to split
    )  # fmt: skip
    max_context_len = inputs.block_tables.shape[1] * 32
    assert select_launch_config(3, 2, 6, 3, 64, max_context_len, torch.float32).num_splits > 1
    check_against_reference(inputs)


@pytest.mark.parametrize("tree_block_n,k_rows", [(16, False), (64, True)])
def test_tree_tiles_smaller_than_tree(tree_block_n, k_rows):
    """Walk state carried across several descending tree tiles, several query blocks."""
    inputs = make_paged_inputs(
        13, [3, 0], [("deep_tree", 45), ("random_tree", 38)], 4, 2, 64, 16, torch.float32
    )
    config = LaunchConfig(
        block_m=32, block_q=16, block_n=32, tree_block_n=tree_block_n, num_splits=1,
        num_warps=4, num_stages=2, k_rows=k_rows,
    )  # fmt: skip
    check_against_reference(inputs, config)


def test_query_blocks_past_256_tree_tokens_walk_per_tile():
    """A 300-token tree: query blocks ending by token 256 take the one-walk path (four bit
    words per row), later ones the per-tile walk; both in one launch."""
    inputs = make_paged_inputs(15, [4, 0], [("random_tree", 300), ("deep_tree", 270)], 2, 1, 64, 16, torch.float32)
    config = select_launch_config(570, 2, 2, 1, 64, inputs.block_tables.shape[1] * 16, torch.float32)
    assert config.block_q == 32 and config.tree_block_n == 64
    check_against_reference(inputs)


def test_non_contiguous_q_and_cache():
    """q and the caches viewed out of larger tensors (strided heads and blocks)."""
    inputs = make_paged_inputs(
        14, [6, 20], [("random_tree", 6), ("chain", 4)], 4, 2, 64, 16, torch.float32
    )
    wide_q = torch.zeros(inputs.q.shape[0], 2 * inputs.q.shape[1], 64, device=DEVICE)
    wide_q[:, ::2] = inputs.q
    inputs.q = wide_q[:, ::2]
    kv = torch.stack([inputs.k_cache, inputs.v_cache], dim=1)  # [num_blocks, 2, ...]
    inputs.k_cache, inputs.v_cache = kv[:, 0], kv[:, 1]
    assert not inputs.q.is_contiguous() and not inputs.k_cache.is_contiguous()
    check_against_reference(inputs)


def test_compile_variants_covers_every_tile_and_split_count():
    """SmolLM2's heads in fp32, 512 positions: tiles of 16, 32 and 64 rows, each unsplit and
    split (6), plus the reduce kernel for 4 splits (512 // 128 = 4); with no room to split, the
    three tiles only."""
    assert select_launch_config(1, 1, 9, 3, 64, 512, torch.float32).num_splits == 4
    assert compile_variants(9, 3, 64, 16, 512, torch.float32, torch.device(DEVICE)) == 7
    assert compile_variants(9, 3, 64, 16, 0, torch.float32, torch.device(DEVICE)) == 3


def test_launch_rules_for_small_grids_and_tree_dominated_steps():
    """head_dim 128 bf16 on 132 SMs: a 256-token tree of one sequence gets 64-row tiles (128
    would leave SMs idle) and no split (a 512-position table is within 8x of the tree); a batch
    of 8 such trees keeps 128-row tiles; decode over a long table still splits."""
    one = select_launch_config(256, 1, 32, 8, 128, 512, torch.bfloat16, num_sms=132)
    assert (one.block_m, one.block_q, one.num_warps, one.num_splits) == (64, 16, 4, 1)
    eight = select_launch_config(8 * 256, 8, 32, 8, 128, 512, torch.bfloat16, num_sms=132)
    assert (eight.block_m, eight.num_warps, eight.num_splits) == (128, 8, 1)
    assert select_launch_config(1, 1, 32, 8, 128, 8192, torch.bfloat16, num_sms=132).num_splits == 32
    assert select_launch_config(256, 1, 32, 8, 128, 4096, torch.bfloat16, num_sms=132).num_splits == 1
    assert select_launch_config(64, 1, 32, 8, 128, 4096, torch.bfloat16, num_sms=132).num_splits == 8


def _num_compiled(kernel) -> int:
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


@pytest.mark.gpu
@gpu
def test_gpu_no_compile_after_compile_variants():
    """After the start-up warm-up, steps of any tree size, batch and context compile nothing."""
    compile_variants(9, 3, 64, 16, 8192, torch.bfloat16, torch.device("cuda"))
    before = _num_compiled(_tree_attention_kernel), _num_compiled(_reduce_splits_kernel)
    generator = torch.Generator().manual_seed(24)
    for trial in range(12):
        batch = int(torch.randint(1, 33, (), generator=generator))
        tree_len = int(torch.randint(1, 257, (), generator=generator)) if batch == 1 else int(
            torch.randint(1, 65, (), generator=generator))
        prefix_lens = [int(x) for x in torch.randint(0, 8000, (batch,), generator=generator)]
        inputs = make_paged_inputs(
            100 + trial, prefix_lens, [("random_tree", tree_len)] * batch, 9, 3, 64, 16, torch.bfloat16,
            spare_table_blocks=int(torch.randint(0, 40, (), generator=generator)),
        )  # fmt: skip
        tree_attention(*inputs.args())
    torch.cuda.synchronize()
    assert (_num_compiled(_tree_attention_kernel), _num_compiled(_reduce_splits_kernel)) == before


# ---------------------------------------------------------------- input checks
def test_rejects_bad_inputs():
    """Checked: ranks, shapes, head_dim, GQA divisibility, dtypes, devices, unit inner strides.

    Not checked (would need a host sync): sum(tree_lens) == num_tokens, topological parents,
    lengths within the block table, block ids in range.
    """
    good = make_paged_inputs(15, [4], [("chain", 3)], 4, 2, 64, 16, torch.float32)

    def call(**changes):
        args = dict(zip(
            ("q", "k_cache", "v_cache", "block_tables", "prefix_lens", "tree_lens", "tree_parents"),
            good.args(),
        ))  # fmt: skip
        args.update(changes)
        return tree_attention(**args)

    with pytest.raises(ValueError, match="num_heads 3 must be a multiple of num_kv_heads 2"):
        call(q=good.q[:, :3])
    with pytest.raises(ValueError, match="head_dim"):
        call(q=good.q[..., :32])
    with pytest.raises(ValueError, match="k_cache and v_cache"):
        call(v_cache=good.v_cache[:-1])
    with pytest.raises(ValueError, match="q must be"):
        call(q=good.q[0])
    with pytest.raises(ValueError, match="tree_parents must have shape"):
        call(tree_parents=good.tree_parents[:2])
    with pytest.raises(ValueError, match="prefix_lens must have shape"):
        call(prefix_lens=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="tree_lens must be int32"):
        call(tree_lens=good.tree_lens.long())
    with pytest.raises(ValueError, match="share a dtype"):
        call(q=good.q.half())
    with pytest.raises(ValueError, match="stride"):
        call(q=good.q.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="power of two"):
        small = torch.zeros(good.k_cache.shape[:3] + (24,), device=DEVICE)
        call(q=good.q[..., :24], k_cache=small, v_cache=small)


# ---------------------------------------------------------------- GPU-sized cases
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(9, 3, 64, 16), (32, 8, 128, 16), (32, 8, 128, 32), (8, 8, 64, 32), (16, 2, 256, 8)],
)
def test_gpu_serving_shapes(dtype, num_heads, num_kv_heads, head_dim, block_size):
    trees = [("random_tree", 256), ("deep_tree", 130), ("chain", 64), ("wide_tree", 100),
             ("single", 1), ("empty", 0), ("forest", 77), ("chain_then_tree", 200)]  # fmt: skip
    inputs = make_paged_inputs(
        20, [1000, 0, 4100, 77, 2048, 5, 300, 513], trees,
        num_heads, num_kv_heads, head_dim, block_size, dtype,
    )  # fmt: skip
    check_against_reference(inputs)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("prefix_len,chunk", [(0, 2048), (3000, 512), (100, 1537)])
def test_gpu_chunked_prefill(prefix_len, chunk):
    inputs = make_paged_inputs(21, [prefix_len], [("chain", chunk)], 32, 8, 128, 16, torch.bfloat16)
    check_against_reference(inputs)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("batch", [1, 3, 32])
@pytest.mark.parametrize("tree_len", [1, 4, 16])
def test_gpu_decode_long_contexts(batch, tree_len):
    """Few tokens over long contexts (the split-KV path where the shapes select it)."""
    generator = torch.Generator().manual_seed(22)
    prefix_lens = [int(x) for x in torch.randint(0, 8192, (batch,), generator=generator)]
    inputs = make_paged_inputs(
        22, prefix_lens, [("random_tree", tree_len)] * batch, 32, 8, 128, 16, torch.bfloat16
    )
    check_against_reference(inputs)


@pytest.mark.gpu
@gpu
def test_gpu_no_host_sync_and_cuda_graph_capture():
    inputs = make_paged_inputs(
        23, [4000, 7], [("random_tree", 20), ("chain", 3)], 32, 8, 128, 16, torch.bfloat16
    )
    expected = tree_attention(*inputs.args())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tree_attention(*inputs.args())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            captured = tree_attention(*inputs.args())
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected, rtol=0, atol=0)
