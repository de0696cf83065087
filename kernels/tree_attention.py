"""Tree attention over a paged KV cache (SpecInfer-style verification), as one Triton kernel.

Every sequence s brings ``prefix_lens[s]`` committed tokens and a token tree of ``tree_lens[s]``
new tokens whose K/V already sit at logical positions ``prefix_lens[s] + i``. Tree token i attends
to the whole prefix and to itself and its ancestors (see
``specserve_kernels.reference.tree_attention_ref``).

Work decomposition::

    grid = (num_query_blocks, num_kv_heads, num_splits)

    num_query_blocks = num_tokens // BLOCK_Q + num_seqs   an upper bound, from shapes alone:
        sequence s owns the query blocks [cu_tree_lens[s] // BLOCK_Q + s, ...), one per BLOCK_Q of
        its tree tokens; a program whose block lies past its sequence's tree exits at once.
        Every program finds its sequence itself from a [SEQS_PAD] cumsum of tree_lens, so the
        launcher computes no helper tensors and launches nothing but the kernel(s).

    one program = BLOCK_Q tree tokens of ONE sequence x the GROUP query heads of ONE kv head,
    packed into the BLOCK_M = BLOCK_Q * GROUP (+ padding) rows of the query tile:

        row r  ->  token q_start + r // GROUP,  head kv_head * GROUP + r % GROUP

    so every K/V tile is loaded once per GQA group. K/V tiles of BLOCK_N positions are gathered
    position by position through the block table (any block size, any physical order).

Mask, inside the kernel, from ``tree_parents``:
    * a sequence whose tree tokens 0 .. q_end-1 form a chain (parent of k is k - 1) takes the
      causal path: key j is visible to query i iff j <= i. This is decode and chunked prefill.
    * a tree whose keys 0 .. q_end-1 number at most 256: every query row walks up its parent
      pointers once, to the root, setting bit j % 64 of word j // 64 of four 64-bit per-row
      words for each ancestor-or-self j; each tree tile then reads its bits from one word. Walk
      steps per program = the deepest row's depth (each step costs O(BLOCK_M) and a block-wide
      reduction).
    * otherwise (a query block past the tree's 256th token): its key tiles are scanned in
      DESCENDING order while every query row walks up its parent pointers. Invariant at the
      top of the tile [j0, j0 + TREE_BLOCK_N): ``cur[r]`` is the largest ancestor-or-self of
      row r's token that is < j0 + TREE_BLOCK_N (-1 once the root has been passed). The walk
      marks ``cur`` in a 64-bit per-row bitmask and steps to its parent until ``cur < j0``;
      the invariant then holds for the next tile down.
      Total walk steps per program = max depth + number of tiles; each step costs O(BLOCK_M).
      A parent >= its child (not topological) is clamped to child - 1, so the walk terminates.

Split-KV (flash-decoding): with few programs (decode, small batches, long contexts) the prefix
of every sequence is cut into ``num_splits`` equal chunks, each handled by its own program; the
last split also handles the tree part. The partial (max, sum, unnormalised output) of every split
go to float32 scratch and ``_reduce_splits_kernel`` combines them. ``num_splits`` is chosen from
shapes only (see ``select_launch_config``), so the launcher never synchronises with the host and
can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
MIN_SPLIT_LEN = 128  # fewest prefix positions worth a split of their own
MAX_SPLITS = 64
DEFAULT_NUM_SMS = 132  # an H100 SXM; used where the device cannot be asked (the CPU interpreter)


@triton.jit
def _load_kv_tile(
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,  # this sequence's row of block_tables
    positions,  # [BLOCK_N] logical positions of the keys
    key_valid,  # [BLOCK_N] positions that exist (unused unless MASKED)
    kv_head,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MASKED: tl.constexpr,  # False: every position exists
    K_ROWS: tl.constexpr,  # load K as [BLOCK_N, HEAD_DIM] and transpose (else load K^T directly)
):
    """K^T [HEAD_DIM, BLOCK_N] and V [BLOCK_N, HEAD_DIM] of one tile, gathered position by
    position through the block table (missing positions read as 0)."""
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        physical_block = tl.load(block_table_ptr + positions // BLOCK_SIZE, mask=key_valid, other=0)
    else:
        physical_block = tl.load(block_table_ptr + positions // BLOCK_SIZE)
    physical_block = physical_block.to(tl.int64)
    slot = positions % BLOCK_SIZE
    k_offsets = physical_block * stride_kb + slot * stride_ks + kv_head * stride_kh
    v_offsets = physical_block * stride_vb + slot * stride_vs + kv_head * stride_vh
    if K_ROWS:
        k_ptrs = k_cache_ptr + k_offsets[:, None] + offs_d[None, :]  # [BLOCK_N, HEAD_DIM]
        if MASKED:
            k_t = tl.trans(tl.load(k_ptrs, mask=key_valid[:, None], other=0.0))
        else:
            k_t = tl.trans(tl.load(k_ptrs))
    else:
        k_ptrs = k_cache_ptr + k_offsets[None, :] + offs_d[:, None]  # [HEAD_DIM, BLOCK_N]
        if MASKED:
            k_t = tl.load(k_ptrs, mask=key_valid[None, :], other=0.0)
        else:
            k_t = tl.load(k_ptrs)
    v_ptrs = v_cache_ptr + v_offsets[:, None] + offs_d[None, :]  # [BLOCK_N, HEAD_DIM]
    if MASKED:
        v = tl.load(v_ptrs, mask=key_valid[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    return k_t, v


@triton.jit
def _online_softmax_step(
    q,  # [BLOCK_M, HEAD_DIM]
    k_t,  # [HEAD_DIM, BLOCK_N]
    v,  # [BLOCK_N, HEAD_DIM]
    allowed,  # [BLOCK_M, BLOCK_N] bool, the mask of this tile (unused unless MASKED)
    m_i,  # [BLOCK_M] running row max, log2 domain
    l_i,  # [BLOCK_M] running row sum
    acc,  # [BLOCK_M, HEAD_DIM] float32, unnormalised output
    qk_scale,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key is visible to every row
):
    """Fold one tile of keys into the running (max, sum, output) of every row."""
    p_dtype = v.dtype
    if UPCAST_DOT:  # the CPU interpreter multiplies bf16 bit patterns (triton-lang/triton#11584)
        k_t = k_t.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(p_dtype).to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# Integers that change from step to step are not specialised on (Triton would otherwise compile a
# variant per "== 1" / "% 16 == 0" pattern of each: multi-second stalls in the middle of serving).
_VARYING = ("num_seqs", "num_splits", "stride_bts", "stride_ps", "stride_pt", "stride_ph", "stride_ms", "stride_mt")


@triton.jit(do_not_specialize=_VARYING)
def _tree_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, HEAD_DIM]
    k_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    v_cache_ptr,  # [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM] (output, when not SPLIT)
    partial_out_ptr,  # [num_splits, num_tokens, num_heads, HEAD_DIM] float32 (output, SPLIT)
    partial_max_ptr,  # [num_splits, num_tokens, num_heads] float32 (output, SPLIT)
    partial_sum_ptr,  # [num_splits, num_tokens, num_heads] float32 (output, SPLIT)
    block_tables_ptr,  # [num_seqs, max_num_blocks] int32
    prefix_lens_ptr,  # [num_seqs] int32
    tree_lens_ptr,  # [num_seqs] int32
    tree_parents_ptr,  # [num_tokens] int32
    num_seqs,
    num_splits,  # programs along the prefix (grid axis 2); 1 unless SPLIT
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bts,
    stride_ps,  # partial_out strides (split, token, head)
    stride_pt,
    stride_ph,
    stride_ms,  # partial_max / partial_sum strides (split, token)
    stride_mt,
    GROUP: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # positions per KV-cache block
    BLOCK_M: tl.constexpr,  # rows of the query tile, >= BLOCK_Q * GROUP
    BLOCK_Q: tl.constexpr,  # tree tokens per program
    BLOCK_N: tl.constexpr,  # keys per prefix tile
    TREE_BLOCK_N: tl.constexpr,  # keys per tree tile, divides 64 (one int64 bitmask per row)
    NUM_WORDS: tl.constexpr,  # trees of up to 64 * NUM_WORDS tokens take the one-walk path (4)
    CHECK_BLOCK: tl.constexpr,  # parents read at once by the chain check
    SEQS_PAD: tl.constexpr,  # a power of two >= num_seqs (at least 64: fewer variants)
    SPLIT: tl.constexpr,  # num_splits > 1: write partial results for _reduce_splits_kernel
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # compute the dots in float32 (the interpreter, for bf16)
    K_ROWS: tl.constexpr,
):
    tl.static_assert(64 % TREE_BLOCK_N == 0)
    tl.static_assert(NUM_WORDS == 4)
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Which sequence owns this query block: sequence s starts at block cu_tree_lens[s] // BLOCK_Q + s.
    offs_s = tl.arange(0, SEQS_PAD)
    all_tree_lens = tl.load(tree_lens_ptr + offs_s, mask=offs_s < num_seqs, other=0)
    cu_tree_lens = tl.cumsum(all_tree_lens, 0) - all_tree_lens  # exclusive
    first_blocks = cu_tree_lens // BLOCK_Q + offs_s
    owners = (offs_s < num_seqs) & (first_blocks <= q_block)
    seq = tl.sum(owners.to(tl.int32), 0) - 1
    is_seq = offs_s == seq
    seq_start = tl.sum(tl.where(is_seq, cu_tree_lens, 0), 0)
    tree_len = tl.sum(tl.where(is_seq, all_tree_lens, 0), 0)
    q_start = (q_block - tl.sum(tl.where(is_seq, first_blocks, 0), 0)) * BLOCK_Q
    if q_start >= tree_len:
        return
    q_end = tl.minimum(q_start + BLOCK_Q, tree_len)
    prefix_len = tl.load(prefix_lens_ptr + seq)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bts
    parents_ptr = tree_parents_ptr + seq_start

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_token = q_start + offs_m // GROUP  # index within the tree
    row_head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (row_token < q_end)
    q_offsets = (seq_start + row_token).to(tl.int64) * stride_qt + row_head * stride_qh
    q = tl.load(q_ptr + q_offsets[:, None] + offs_d[None, :], mask=row_valid[:, None], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # The prefix (this split's chunk of it): every position is visible to every row.
    if not SPLIT:
        kv_lo = 0
        kv_hi = prefix_len
    else:
        chunk = tl.cdiv(tl.cdiv(prefix_len, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = tl.minimum(split * chunk, prefix_len)
        kv_hi = tl.minimum(kv_lo + chunk, prefix_len)
    offs_n = tl.arange(0, BLOCK_N)
    full_hi = kv_lo + (kv_hi - kv_lo) // BLOCK_N * BLOCK_N
    for start_n in range(kv_lo, full_hi, BLOCK_N):  # whole tiles: no masks
        k_t, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_table_ptr, start_n + offs_n, None, kv_head,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            HEAD_DIM, BLOCK_SIZE, False, K_ROWS,
        )  # fmt: skip
        m_i, l_i, acc = _online_softmax_step(
            q, k_t, v, None, m_i, l_i, acc, qk_scale, DOT_PRECISION, UPCAST_DOT, False
        )
    if full_hi < kv_hi:  # the ragged last tile
        positions = full_hi + offs_n
        key_valid = positions < kv_hi
        k_t, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_table_ptr, positions, key_valid, kv_head,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            HEAD_DIM, BLOCK_SIZE, True, K_ROWS,
        )  # fmt: skip
        m_i, l_i, acc = _online_softmax_step(
            q, k_t, v, key_valid[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION, UPCAST_DOT,
            True,
        )  # fmt: skip

    # The tree: keys 0 .. q_end - 1 of it, at positions prefix_len + j.
    if split == num_splits - 1:
        offs_tn = tl.arange(0, TREE_BLOCK_N)
        num_tree_tiles = tl.cdiv(q_end, TREE_BLOCK_N)
        offs_check = tl.arange(0, CHECK_BLOCK)
        num_breaks = tl.zeros([], dtype=tl.int32)  # tokens k < q_end whose parent is not k - 1
        for check_start in range(0, q_end, CHECK_BLOCK):
            check = check_start + offs_check
            parent = tl.load(parents_ptr + check, mask=check < q_end, other=0)
            num_breaks += tl.sum(((check < q_end) & (parent != check - 1)).to(tl.int32), 0)
        if num_breaks == 0:  # a chain: causal attention
            for tile in range(num_tree_tiles):
                offs_j = tile * TREE_BLOCK_N + offs_tn
                key_valid = offs_j < q_end
                k_t, v = _load_kv_tile(
                    k_cache_ptr, v_cache_ptr, block_table_ptr, prefix_len + offs_j, key_valid,
                    kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    HEAD_DIM, BLOCK_SIZE, True, K_ROWS,
                )  # fmt: skip
                allowed = (offs_j[None, :] <= row_token[:, None]) & key_valid[None, :]
                m_i, l_i, acc = _online_softmax_step(
                    q, k_t, v, allowed, m_i, l_i, acc, qk_scale, DOT_PRECISION, UPCAST_DOT, True
                )
        elif q_end <= 64 * NUM_WORDS:  # a small tree: one walk to the roots, then the tiles
            cur = tl.where(row_valid, row_token, -1)  # [BLOCK_M]
            word0 = tl.zeros([BLOCK_M], dtype=tl.int64)  # bit c of word w: key 64 w + c is visible
            word1 = tl.zeros([BLOCK_M], dtype=tl.int64)
            word2 = tl.zeros([BLOCK_M], dtype=tl.int64)
            word3 = tl.zeros([BLOCK_M], dtype=tl.int64)
            need = cur >= 0
            while tl.max(need.to(tl.int32), 0) > 0:
                bit = tl.where(need, tl.full([BLOCK_M], 1, tl.int64) << (cur % 64).to(tl.int64), 0)
                word = cur // 64
                word0 = word0 | tl.where(word == 0, bit, 0)
                word1 = word1 | tl.where(word == 1, bit, 0)
                word2 = word2 | tl.where(word == 2, bit, 0)
                word3 = word3 | tl.where(word == 3, bit, 0)
                parent = tl.load(parents_ptr + cur, mask=need, other=-1)
                cur = tl.where(need, tl.minimum(parent, cur - 1), cur)
                need = cur >= 0
            for tile in range(num_tree_tiles):
                j0 = tile * TREE_BLOCK_N  # a tile lies within one word (TREE_BLOCK_N divides 64)
                offs_j = j0 + offs_tn
                key_valid = offs_j < q_end
                k_t, v = _load_kv_tile(
                    k_cache_ptr, v_cache_ptr, block_table_ptr, prefix_len + offs_j, key_valid,
                    kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    HEAD_DIM, BLOCK_SIZE, True, K_ROWS,
                )  # fmt: skip
                w = j0 // 64
                bits = tl.where(w == 0, word0, tl.where(w == 1, word1, tl.where(w == 2, word2, word3)))
                bits = bits >> (j0 % 64).to(tl.int64)
                allowed = ((bits[:, None] >> offs_tn[None, :].to(tl.int64)) & 1) != 0
                m_i, l_i, acc = _online_softmax_step(
                    q, k_t, v, allowed, m_i, l_i, acc, qk_scale, DOT_PRECISION, UPCAST_DOT, True
                )
        else:  # a large tree: walk the parent pointers per tile, tiles in descending order
            cur = tl.where(row_valid, row_token, -1)  # [BLOCK_M]
            for tile in range(num_tree_tiles):
                j0 = (num_tree_tiles - 1 - tile) * TREE_BLOCK_N
                offs_j = j0 + offs_tn
                key_valid = offs_j < q_end
                # issued before the walk, so that the loads overlap its dependent steps
                k_t, v = _load_kv_tile(
                    k_cache_ptr, v_cache_ptr, block_table_ptr, prefix_len + offs_j, key_valid,
                    kv_head, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    HEAD_DIM, BLOCK_SIZE, True, K_ROWS,
                )  # fmt: skip
                bits = tl.zeros([BLOCK_M], dtype=tl.int64)  # bit c: key j0 + c is visible
                need = cur >= j0
                while tl.max(need.to(tl.int32), 0) > 0:
                    shift = tl.where(need, cur - j0, 0).to(tl.int64)
                    bits = bits | tl.where(need, tl.full([BLOCK_M], 1, tl.int64) << shift, 0)
                    parent = tl.load(parents_ptr + cur, mask=need, other=-1)
                    cur = tl.where(need, tl.minimum(parent, cur - 1), cur)
                    need = cur >= j0
                allowed = ((bits[:, None] >> offs_tn[None, :].to(tl.int64)) & 1) != 0
                m_i, l_i, acc = _online_softmax_step(
                    q, k_t, v, allowed, m_i, l_i, acc, qk_scale, DOT_PRECISION, UPCAST_DOT, True
                )

    token = (seq_start + row_token).to(tl.int64)
    if not SPLIT:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        out_offsets = token * stride_ot + row_head * stride_oh
        tl.store(
            out_ptr + out_offsets[:, None] + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None],
        )
    else:
        partial_offsets = split * stride_ps + token * stride_pt + row_head * stride_ph
        tl.store(
            partial_out_ptr + partial_offsets[:, None] + offs_d[None, :],
            acc,
            mask=row_valid[:, None],
        )
        stat_offsets = split * stride_ms + token * stride_mt + row_head
        tl.store(partial_max_ptr + stat_offsets, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + stat_offsets, l_i, mask=row_valid)


@triton.jit(do_not_specialize=("num_heads", "stride_ps", "stride_pt", "stride_ph", "stride_ms", "stride_mt"))
def _reduce_splits_kernel(
    partial_out_ptr,  # [NUM_SPLITS, num_tokens, num_heads, HEAD_DIM] float32
    partial_max_ptr,  # [NUM_SPLITS, num_tokens, num_heads] float32
    partial_sum_ptr,  # [NUM_SPLITS, num_tokens, num_heads] float32
    out_ptr,  # [num_tokens, num_heads, HEAD_DIM] (output)
    num_heads,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ms,
    stride_mt,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """out = sum_s exp2(m_s - m) acc_s / sum_s exp2(m_s - m) l_s over the splits s."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_split = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    stat_offsets = offs_split * stride_ms + token * stride_mt + head
    split_max = tl.load(partial_max_ptr + stat_offsets)
    split_sum = tl.load(partial_sum_ptr + stat_offsets)
    row_max = tl.max(split_max, 0)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    weight = tl.exp2(split_max - row_max)  # 0 for splits that saw no key
    partial_offsets = offs_split * stride_ps + token * stride_pt + head * stride_ph
    partial = tl.load(partial_out_ptr + partial_offsets[:, None] + offs_d[None, :])
    total = tl.sum(split_sum * weight, 0)
    out = tl.sum(partial * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty)
    )


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and split count of one launch; every field follows from shapes alone."""

    block_m: int  # rows of the query tile (power of two >= 16)
    block_q: int  # tree tokens per program, block_m // group
    block_n: int  # keys per prefix tile
    tree_block_n: int  # keys per tree tile (a divisor of 64)
    num_splits: int  # programs per (query block, kv head) along the prefix; power of two
    num_warps: int
    num_stages: int
    k_rows: bool = False  # load K tiles row-major and transpose them in registers


@functools.lru_cache(maxsize=1024)
def select_launch_config(
    num_tokens: int,
    num_seqs: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_context_len: int,
    dtype: torch.dtype,
    num_sms: int = DEFAULT_NUM_SMS,
) -> LaunchConfig:
    """Heuristic tiles from shapes (no autotuning, so no host sync and no first-call benchmark).

    Tiles were picked on an H100 (bench/kernel_tree_attention.py): 128 x 128 tiles, 8 warps and
    row-major K loads for head_dim 128; 64 x 128 tiles and 4 warps for head_dim 64.

    Small grids: if 128-row tiles would give fewer programs than SMs, 64-row tiles are used
    (a tree of 256 over a 256 context, head_dim 128, batch 1: 0.020 ms against 0.035 ms with
    128 rows and 4 splits; measured on the H100, CUDA graphs).

    Split rule: if the (query blocks x kv heads) programs would not fill the GPU's SMs and the
    block table holds at least 2 * MIN_SPLIT_LEN positions, cut every prefix into
    num_splits = prev_pow2(ceil(3 * num_sms / programs)) chunks (about three programs per SM), at
    most prev_pow2(max_context_len // MIN_SPLIT_LEN) and MAX_SPLITS. ``max_context_len`` is the
    block table's capacity (max_num_blocks * block_size), an upper bound of every prefix. No split
    for trees of 64+ tokens per sequence in a table of at most 8x that: the last split would
    still walk the whole tree, so splitting only adds the reduction.
    """
    group = num_heads // num_kv_heads
    tokens_per_seq = triton.cdiv(num_tokens, max(num_seqs, 1))
    max_block_m = _max_block_m(head_dim, dtype)
    block_m = min(max(triton.next_power_of_2(tokens_per_seq * group), 16), max_block_m)
    block_m = max(block_m, triton.next_power_of_2(group))
    if block_m > 64 and 64 >= group and (num_tokens // (block_m // group) + num_seqs) * num_kv_heads < num_sms:
        block_m = 64
    tile = launch_tile(block_m, group, head_dim, dtype)
    num_programs = (num_tokens // tile.block_q + num_seqs) * num_kv_heads
    tree_dominates = tokens_per_seq >= 64 and max_context_len <= 8 * tokens_per_seq
    if num_programs < num_sms and max_context_len >= 2 * MIN_SPLIT_LEN and not tree_dominates:
        wanted = triton.cdiv(3 * num_sms, num_programs)
        by_length = max_context_len // MIN_SPLIT_LEN
        tile = dataclasses.replace(tile, num_splits=1 << int(math.log2(min(wanted, by_length, MAX_SPLITS))))
    return tile


def _max_block_m(head_dim: int, dtype: torch.dtype) -> int:
    return 128 if 64 < head_dim <= 128 and dtype != torch.float32 else 64


def launch_tile(block_m: int, group: int, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """The unsplit launch config of a ``block_m``-row query tile (everything but the split
    count follows from block_m, head_dim and dtype)."""
    if dtype == torch.float32 or head_dim > 128:
        block_n = 32 if head_dim > 128 else 64
    else:
        block_n = 128
    tree_block_n = 32 if head_dim > 128 else 64
    num_warps = 8 if block_m >= 128 else 4
    num_stages = 2 if head_dim > 128 else 3
    k_rows = head_dim >= 128 and dtype != torch.float32
    return LaunchConfig(block_m, block_m // group, block_n, tree_block_n, 1, num_warps, num_stages, k_rows)


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    tree_lens: torch.Tensor,
    tree_parents: torch.Tensor,
) -> None:
    """Shape, dtype, device and stride checks; none of them reads device memory.

    Not checked (each would need a host sync): sum(tree_lens) == num_tokens, parents being
    topological within their sequence, prefix_lens + tree_lens fitting the block table, and the
    block ids being in range.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but the KV cache has {cache_head_dim}")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in 16..256, got {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads} (GQA)"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache and v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype}"
        )
    if block_tables.dim() != 2:
        raise ValueError(
            f"block_tables must be [num_seqs, max_num_blocks], got {tuple(block_tables.shape)}"
        )
    num_seqs = block_tables.shape[0]
    for name, tensor, shape in (
        ("prefix_lens", prefix_lens, (num_seqs,)),
        ("tree_lens", tree_lens, (num_seqs,)),
        ("tree_parents", tree_parents, (num_tokens,)),
    ):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    for name, tensor in (
        ("block_tables", block_tables),
        ("prefix_lens", prefix_lens),
        ("tree_lens", tree_lens),
        ("tree_parents", tree_parents),
    ):
        if tensor.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {tensor.dtype}; convert with .int()")
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")
    if k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError(f"the KV cache must be on q's device {q.device}")
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride(-1) == 1)")
    for name, tensor in (("prefix_lens", prefix_lens), ("tree_lens", tree_lens)):
        if num_seqs > 1 and tensor.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous")
    if num_tokens > 1 and tree_parents.stride(0) != 1:
        raise ValueError("tree_parents must be contiguous")
    if block_tables.shape[1] > 1 and block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along max_num_blocks")


def launch_tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    tree_lens: torch.Tensor,
    tree_parents: torch.Tensor,
    scale: float,
    config: LaunchConfig,
) -> torch.Tensor:
    """``tree_attention`` with explicit tiles and split count; inputs are assumed checked."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_seqs = block_tables.shape[0]
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    num_splits = config.num_splits
    if num_splits > 1:
        partial_out = torch.empty(
            (num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32, device=q.device
        )
        partial_max = torch.empty(
            (num_splits, num_tokens, num_heads), dtype=torch.float32, device=q.device
        )
        partial_sum = torch.empty_like(partial_max)
    else:
        partial_out = partial_max = partial_sum = out  # unused
    grid = (num_tokens // config.block_q + num_seqs, num_kv_heads, num_splits)
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, out, partial_out, partial_max, partial_sum,
        block_tables, prefix_lens, tree_lens, tree_parents,
        num_seqs, num_splits, scale * LOG2_E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        *partial_out.stride()[:3], *partial_max.stride()[:2],
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        BLOCK_Q=config.block_q,
        BLOCK_N=config.block_n,
        TREE_BLOCK_N=config.tree_block_n,
        SEQS_PAD=max(triton.next_power_of_2(num_seqs), 64),  # few variants to compile
        CHECK_BLOCK=256,
        NUM_WORDS=4,
        SPLIT=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOT=q.dtype == torch.bfloat16 and q.device.type != "cuda",
        K_ROWS=config.k_rows,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _reduce_splits_kernel[(num_tokens, num_heads)](
            partial_out, partial_max, partial_sum, out,
            num_heads,
            *partial_out.stride()[:3], *partial_max.stride()[:2],
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            num_warps=4 if head_dim * num_splits >= 4096 else 2,
        )  # fmt: skip
    return out


def compile_variants(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    max_context_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """Launch, once each on tiny inputs, every kernel variant ``tree_attention`` can pick for this
    model (so Triton compiles them all now, not in the middle of serving); returns the number of
    distinct compiled variants launched.

    A variant is fixed by the ``LaunchConfig`` fields other than ``num_splits``, whether it splits,
    and the reduce kernel's split count. ``select_launch_config`` picks a tile of block_m rows, a
    power of two from max(16, group) to ``_max_block_m``, and a power-of-two split count no
    greater than the one a single one-token sequence gets at ``max_context_len``.
    """
    num_sms = _num_sms(device) if device.type == "cuda" else DEFAULT_NUM_SMS
    group = num_heads // num_kv_heads
    smallest = max(16, triton.next_power_of_2(group))
    tiles = [launch_tile(1 << i, group, head_dim, dtype)
             for i in range(int(math.log2(smallest)), int(math.log2(max(smallest, _max_block_m(head_dim, dtype)))) + 1)]
    most = select_launch_config(1, 1, num_heads, num_kv_heads, head_dim, max_context_len, dtype, num_sms)
    split_counts = [1] + [1 << i for i in range(1, int(math.log2(most.num_splits)) + 1)]
    width = -(-max(c.block_q for c in tiles) // block_size)
    k_cache = torch.zeros((width, block_size, num_kv_heads, head_dim), dtype=dtype, device=device)
    block_table = torch.arange(width, dtype=torch.int32, device=device)[None]
    variants = set()
    for tile in sorted(tiles, key=lambda c: c.block_m):
        for num_splits in split_counts:
            key = (tile, num_splits > 1) if num_splits <= 2 else ("reduce", num_splits)
            if key in variants:
                continue
            variants.add(key)
            n = tile.block_q
            launch_tree_attention(
                torch.zeros((n, num_heads, head_dim), dtype=dtype, device=device), k_cache, k_cache,
                block_table, torch.zeros(1, dtype=torch.int32, device=device),
                torch.full((1,), n, dtype=torch.int32, device=device),
                torch.arange(-1, n - 1, dtype=torch.int32, device=device),
                1.0, dataclasses.replace(tile, num_splits=num_splits),
            )
    return len(variants)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    tree_lens: torch.Tensor,
    tree_parents: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of every tree token over its sequence's prefix and its own ancestors.

    q             [num_tokens, num_heads, head_dim]   sequences concatenated, each in topological order
    k_cache       [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache       [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables  [num_seqs, max_num_blocks] int32; tree token i of sequence s has its K/V at
                  logical position prefix_lens[s] + i
    prefix_lens   [num_seqs] int32, committed tokens before the tree
    tree_lens     [num_seqs] int32, tree tokens per sequence (0 allowed), sum == num_tokens
    tree_parents  [num_tokens] int32, parent's index within the same sequence's tree, -1 for a root
    returns       [num_tokens, num_heads, head_dim] in q's dtype

    Never synchronises with the host: safe to capture in a CUDA graph. The checks done are listed
    in ``_check_inputs``; what would need a host sync is not checked.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, prefix_lens, tree_lens, tree_parents)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    num_sms = _num_sms(q.device) if q.is_cuda else DEFAULT_NUM_SMS
    config = select_launch_config(
        num_tokens,
        block_tables.shape[0],
        num_heads,
        num_kv_heads,
        head_dim,
        block_tables.shape[1] * block_size,
        q.dtype,
        num_sms,
    )
    return launch_tree_attention(
        q, k_cache, v_cache, block_tables, prefix_lens, tree_lens, tree_parents, scale, config
    )
