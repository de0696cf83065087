"""Our Llama-family decoder (Llama 2/3, SmolLM2, Mistral without sliding window, Qwen2).

Reads and writes a paged KV cache through ``AttentionMetadata``; the attention backend is
passed in (Triton kernel or PyTorch reference), never looked up from global state.

Parameter names follow transformers' checkpoints, except that q/k/v and gate/up are fused
(``qkv_proj`` = cat(q, k, v), ``gate_up_proj`` = cat(gate, up)) to launch fewer kernels.
With an attention backend whose ``fused_ops`` is set (Triton on CUDA), the residual add with
the RMSNorm after it, rope with the K/V write, and silu(gate) * up each run as one kernel
(``kernels/rms_norm.py``, ``rope_kv.py``, ``silu_mul.py``) instead of the ~45 small PyTorch
kernels a layer launches otherwise; without it the layers call those kernels' PyTorch
references (``*_ref``, the same files).

The residual stream travels between layers in two parts, as (output, residual): a layer's last
output is added to the stream by the next norm (the next layer's, or the final one), so every
add rides in a norm's launch. The stream's value is output + residual, added in that order's
rounding exactly as ``hidden = hidden + f(hidden)`` adds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from specserve.models.attention import AttentionBackend, AttentionMetadata
from specserve.models.config import LlamaArchConfig
from specserve.models.rope import rope_cos_sin
from specserve_kernels.rms_norm import (
    MAX_HIDDEN_SIZE,
    add_rms_norm,
    add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from specserve_kernels.rope_kv import rope_kv, rope_kv_ref
from specserve_kernels.silu_mul import silu_mul, silu_mul_ref


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused and x.shape[-1] <= MAX_HIDDEN_SIZE:
            return rms_norm(x, self.weight, self.eps)
        return rms_norm_ref(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add and this norm, one launch fused."""
        if fused and x.shape[-1] <= MAX_HIDDEN_SIZE:
            return add_rms_norm(x, residual, self.weight, self.eps)
        return add_rms_norm_ref(x, residual, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaArchConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.scale = cfg.head_dim**-0.5
        self.rope_kv_fusable = cfg.head_dim & (cfg.head_dim - 1) == 0  # the fused kernel's condition

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        cos_sin: torch.Tensor,  # [num_tokens, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        attention: AttentionBackend,
    ) -> torch.Tensor:
        cfg = self.cfg
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        qkv = self.qkv_proj(hidden)
        fn = rope_kv if attention.fused_ops and self.rope_kv_fusable else rope_kv_ref
        q = fn(qkv, cos_sin, k_cache, v_cache, meta.slot_mapping, cfg.num_heads, cfg.num_kv_heads)
        out = attention.fn(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, cfg.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaArchConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(silu_mul(gate_up) if fused else silu_mul_ref(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaArchConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size] the previous layer's output (the embedding first)
        residual: torch.Tensor | None,  # [num_tokens, hidden_size] the stream before it; None first
        cos_sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        attention: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the stream before it): the stream after the layer is their sum."""
        fused = attention.fused_ops
        if residual is None:
            residual, x = hidden, self.input_layernorm(hidden, fused)
        else:
            x, residual = self.input_layernorm.add(hidden, residual, fused)
        hidden = self.self_attn(x, cos_sin, kv_cache, meta, attention)
        x, residual = self.post_attention_layernorm.add(hidden, residual, fused)
        return self.mlp(x, fused), residual


class LlamaForCausalLM(nn.Module):
    """The decoder plus its LM head. ``forward`` returns hidden states; ``compute_logits`` the logits.

    kv_caches passed to forward: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    (layer i reads and writes kv_caches[i]).
    """

    def __init__(self, cfg: LlamaArchConfig, attention: AttentionBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.attention = attention
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(
            cfg.hidden_size, cfg.vocab_size, bias=False
        )
        self.register_buffer(
            "cos_sin",
            rope_cos_sin(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling),
            persistent=False,
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [num_tokens, hidden_size].

        ``num_layers`` < cfg.num_layers runs only the first layers (the early-exit drafter);
        kv_caches then needs only that many layers.
        """
        return self.run_layers(self.embed_tokens(input_ids), positions, kv_caches, meta, num_layers)

    def run_layers(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size] the first layer's input
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """The decoder layers (the first ``num_layers``) and the final norm: [num_tokens, hidden_size]."""
        cos_sin = self.cos_sin[positions]
        residual = None
        # layer_sequence first: zip exhausts it, which an offloaded model's streaming relies on
        for layer, kv_cache in zip(self.layer_sequence(num_layers or self.cfg.num_layers), kv_caches):
            hidden, residual = layer(hidden, residual, cos_sin, kv_cache, meta, self.attention)
        if residual is None:
            return self.norm(hidden, self.attention.fused_ops)
        return self.norm.add(hidden, residual, self.attention.fused_ops)[0]

    def layer_sequence(self, num_layers: int) -> Iterator[Callable[..., torch.Tensor]]:
        """The first ``num_layers`` decoder layers, in order, each callable as
        ``layer(hidden, residual, cos_sin, kv_cache, meta, attention) -> (hidden, residual)``. Resident here; the offloaded
        model streams its layers' weights in as the iteration reaches them."""
        return iter(self.layers[:num_layers])

    def streamed_layers(self, num_layers: int) -> int:
        """How many of the first ``num_layers`` layers a forward streams in from host memory
        (an offloaded model's); none here."""
        return 0

    def before_graph_replay(self) -> None:
        """Called before a captured forward that streams layers replays (the offloaded model
        waits for its prefetched layers); nothing here."""

    def after_graph_replay(self, num_layers: int) -> None:
        """Called after a captured forward of the first ``num_layers`` layers that streams some
        is enqueued (the offloaded model prefetches what it overwrote); nothing here."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden_size] -> [num_tokens, vocab_size] float32."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
