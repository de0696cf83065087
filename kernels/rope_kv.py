"""Rotary embedding of q and k, and the K/V write into the paged cache, in one kernel launch
(instead of about twenty: rotating q, rotating k, two scatters).

    qkv          [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]   qkv_proj's output: q | k | v
    cos_sin      [num_tokens, head_dim] floats      cos in the first half, sin in the second
    k_cache      [num_blocks, block_size, num_kv_heads, head_dim]  (output: rotated k at each slot)
    v_cache      [num_blocks, block_size, num_kv_heads, head_dim]  (output: v at each slot)
    slot_mapping [num_tokens] int64, contiguous     block_id * block_size + offset
    returns q    [num_tokens, num_heads, head_dim]  rotated, qkv's dtype

"Rotate half" layout (transformers' Llama): x = (x1 | x2) -> (x1 cos - x2 sin | x2 cos + x1 sin),
computed in float32 and rounded to the dtype, as the reference does. One program handles one
head of one token: programs 0 .. num_heads - 1 a q head, the next num_kv_heads a k head and
the v head of the same index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specserve.models.attention import write_kv
from specserve.models.rope import apply_rope


def rope_kv_ref(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Rope, then ``write_kv``: what ``LlamaAttention`` runs without the fused kernel."""
    head_dim = cos_sin.shape[-1]
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = apply_rope(q.view(-1, num_heads, head_dim), cos_sin)
    k = apply_rope(k.view(-1, num_kv_heads, head_dim), cos_sin)
    write_kv(k_cache, v_cache, k, v.view(-1, num_kv_heads, head_dim), slot_mapping)
    return q


@triton.jit
def _rope_kv_kernel(
    QKV, COS_SIN, K_CACHE, V_CACHE, SLOTS, Q_OUT,
    stride_qkv, stride_cs, stride_slot, stride_q_tok,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, half)
    cos = tl.load(COS_SIN + token * stride_cs + d).to(tl.float32)
    sin = tl.load(COS_SIN + token * stride_cs + half + d).to(tl.float32)
    src = QKV + token * stride_qkv + head * HEAD_DIM  # q heads, then k heads: consecutive in qkv
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + half + d).to(tl.float32)
    out1 = (x1 * cos - x2 * sin).to(Q_OUT.dtype.element_ty)
    out2 = (x2 * cos + x1 * sin).to(Q_OUT.dtype.element_ty)
    if head < NUM_HEADS:
        dst = Q_OUT + token * stride_q_tok + head * HEAD_DIM
        tl.store(dst + d, out1)
        tl.store(dst + half + d, out2)
    else:
        kv_head = head - NUM_HEADS
        slot = tl.load(SLOTS + token)
        k_dst = K_CACHE + slot * stride_slot + kv_head * HEAD_DIM
        tl.store(k_dst + d, out1.to(K_CACHE.dtype.element_ty))
        tl.store(k_dst + half + d, out2.to(K_CACHE.dtype.element_ty))
        v_src = QKV + token * stride_qkv + (NUM_HEADS + NUM_KV_HEADS + kv_head) * HEAD_DIM
        v_dst = V_CACHE + slot * stride_slot + kv_head * HEAD_DIM
        full = tl.arange(0, HEAD_DIM)
        tl.store(v_dst + full, tl.load(v_src + full).to(V_CACHE.dtype.element_ty))


def rope_kv(
    qkv: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """See the module docstring; never synchronises with the host (CUDA-graph safe)."""
    num_tokens, head_dim = cos_sin.shape
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"rope_kv needs a power-of-two head_dim, not {head_dim}")
    if qkv.shape != (num_tokens, (num_heads + 2 * num_kv_heads) * head_dim) or qkv.stride(-1) != 1:
        raise ValueError(f"rope_kv wants qkv [{num_tokens}, {(num_heads + 2 * num_kv_heads) * head_dim}], "
                         f"not {tuple(qkv.shape)}")
    if not cos_sin.is_floating_point() or cos_sin.stride(-1) != 1:
        raise ValueError("rope_kv wants cos_sin [num_tokens, head_dim] floats, the last dim contiguous")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype != torch.int64 or slot_mapping.stride(0) != 1:
        raise ValueError("rope_kv wants slot_mapping [num_tokens] int64, contiguous")
    for cache in (k_cache, v_cache):
        if cache.shape[2:] != (num_kv_heads, head_dim) or cache.stride() != k_cache.stride() or (
            cache.stride(3) != 1 or cache.stride(2) != head_dim or cache.stride(0) != cache.shape[1] * cache.stride(1)
        ):
            raise ValueError("rope_kv wants k_cache and v_cache [num_blocks, block_size, num_kv_heads, head_dim], "
                             "each block's slots contiguous")
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    _rope_kv_kernel[(num_tokens, num_heads + num_kv_heads)](
        qkv, cos_sin, k_cache, v_cache, slot_mapping, q,
        qkv.stride(0), cos_sin.stride(0), k_cache.stride(1), q.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, num_warps=1,
    )
    return q
