"""Paged attention for one forward step, driven by an explicit metadata object.

Every forward is a batch of token trees: sequence s contributes ``tree_lens[s]`` new tokens
whose K/V are written at logical positions ``prefix_lens[s] .. prefix_lens[s] + tree_lens[s]``
of its block table, then each token attends to the prefix and to its own tree ancestors.
Prefill chunks are chains, plain decode is a one-token tree, verification a draft tree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specserve_kernels.cpu_tree_attention import DenseAttentionPlan, dense_tree_attention


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset to write K/V to
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32
    prefix_lens: torch.Tensor  # [num_seqs] int32, tokens already cached before the tree
    tree_lens: torch.Tensor  # [num_seqs] int32, new tokens per sequence
    tree_parents: torch.Tensor  # [num_tokens] int32, parent within the sequence's tree, -1 root
    dense_plan: DenseAttentionPlan | None = None  # host-built plan, only for the "dense" backend


@dataclass(frozen=True)
class AttentionBackend:
    """How a layer attends: ``fn(q, k_cache, v_cache, meta, scale) -> [num_tokens, num_heads, head_dim]``.

    "triton": the tree-attention kernel (CUDA); "dense": batched PyTorch SDPA over a plan built
    once per step (CPU); "reference": the per-sequence PyTorch reference (tests).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    needs_dense_plan: bool = False
    compiles: bool = False  # Triton on CUDA: compile its variants at start-up (``warm_up``)
    fused_ops: bool = False  # the model's layers use the fused Triton kernels (norm, rope + K/V write, silu-mul)

    def warm_up(self, cfg, block_size: int, max_context_len: int, dtype: torch.dtype, device: torch.device) -> int:
        """Compile every kernel variant the engine's steps can need (none off CUDA); the count."""
        if not self.compiles or device.type != "cuda":
            return 0
        from specserve_kernels.tree_attention import compile_variants

        return compile_variants(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, block_size, max_context_len,
                                dtype, device)


def _triton(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    from specserve_kernels.tree_attention import tree_attention

    return tree_attention(q, k_cache, v_cache, meta.block_tables, meta.prefix_lens, meta.tree_lens,
                          meta.tree_parents, scale)


def _reference(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    from specserve_kernels.reference import tree_attention_ref

    return tree_attention_ref(q, k_cache, v_cache, meta.block_tables, meta.prefix_lens,
                              meta.tree_lens, meta.tree_parents, scale)


def _dense(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    return dense_tree_attention(q, k_cache, v_cache, meta.dense_plan, scale)


BACKENDS = {
    "triton": AttentionBackend("triton", _triton, compiles=True, fused_ops=True),
    "dense": AttentionBackend("dense", _dense, needs_dense_plan=True),
    "reference": AttentionBackend("reference", _reference),
}


def select_attention_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """``name``, or for "auto" the Triton kernel on CUDA and batched dense attention on the CPU
    (the kernel runs on the CPU only through Triton's interpreter, TRITON_INTERPRET=1)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "dense"
    return BACKENDS[name]


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter new K/V into the paged cache.

    k_cache, v_cache  [num_blocks, block_size, num_kv_heads, head_dim] (output)
    k, v              [num_tokens, num_kv_heads, head_dim]
    slot_mapping      [num_tokens] int64
    """
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
