"""A feature-level draft (EAGLE-style): a small decoder that reads the target's own hidden state.

The target's final-norm hidden state h_p at position p is what its LM head turns into the
distribution of token p + 1. The draft predicts that state one step ahead and reuses the
target's LM head::

    input at position p   x_p = fc([embed(token_p), h_{p-1}])      (h_{-1} = 0)
    output                f_p = norm(layers(x_p))  ~  h_p,  logits = lm_head(f_p)

Inside a draft tree the target's states of draft tokens do not exist yet, so a node at depth
d >= 1 reads its parent's *predicted* state instead: node u at position p takes
[embed(token_u), f_parent(u)], and the tree's root (the target's pending token at position r)
takes the real h_{r-1}. Training unrolls exactly this (``draft_models.dense_forward.
feature_passes``), so the draft learns to read its own predictions.

The draft is a ``LlamaForCausalLM`` of few layers that shares the target's embedding and LM
head (``small_draft``: saved, loaded and fingerprinted like a token-level draft), plus ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn

from specserve.models.attention import AttentionBackend, AttentionMetadata
from specserve.models.config import LlamaArchConfig
from specserve.models.llama import LlamaForCausalLM


class FeatureDraft(LlamaForCausalLM):
    def __init__(self, cfg: LlamaArchConfig, attention: AttentionBackend) -> None:
        super().__init__(cfg, attention)
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=True)

    def input_hidden(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """input_ids [...] int64, features [..., hidden] (the state each token reads) -> [..., hidden]."""
        embeds = self.embed_tokens(input_ids)
        return self.fc(torch.cat([embeds, features.to(embeds.dtype)], dim=-1))

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        num_layers: int | None = None,
        features: torch.Tensor | None = None,  # [num_tokens, hidden_size]
    ) -> torch.Tensor:
        """Predicted states f [num_tokens, hidden_size] (``compute_logits`` gives the logits)."""
        if features is None:
            raise ValueError("a feature draft needs the state each token reads (features)")
        return self.run_layers(self.input_hidden(input_ids, features), positions, kv_caches, meta, num_layers)
