"""How many layers fit on the device under a memory budget for weights.

    budget >= outside_layers + (num_resident + B) * layer_bytes
    outside_layers = embeddings (+ untied LM head) + final norm;  + B: the streaming buffers (B >= 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.errors import SpecserveError
from specserve.models.config import LlamaArchConfig


@dataclass(frozen=True)
class ResidencyPlan:
    num_resident: int
    num_offloaded: int
    layer_bytes: int
    device_bytes: int  # weights and streaming buffers kept on the device
    host_bytes: int  # offloaded layers in host memory (= bytes streamed per forward)


def layer_numel(arch: LlamaArchConfig) -> int:
    attention = arch.hidden_size * (arch.q_size + 2 * arch.kv_size) + arch.q_size * arch.hidden_size
    if arch.attention_bias:
        attention += arch.q_size + 2 * arch.kv_size
    if arch.o_proj_bias:
        attention += arch.hidden_size
    return attention + 3 * arch.hidden_size * arch.intermediate_size + 2 * arch.hidden_size


def plan_residency(arch: LlamaArchConfig, dtype: torch.dtype, budget_gb: float | None,
                   num_buffers: int = 2) -> ResidencyPlan:
    """``budget_gb`` None: nothing resident (every layer streamed). ``num_buffers`` working
    buffers are counted against the budget."""
    element = torch.empty((), dtype=dtype).element_size()
    layer_bytes = layer_numel(arch) * element
    heads = 1 if arch.tie_word_embeddings else 2
    outside = (heads * arch.vocab_size * arch.hidden_size + arch.hidden_size) * element
    fixed = outside + num_buffers * layer_bytes
    if budget_gb is None:
        num_resident = 0
    else:
        budget = budget_gb * 1e9
        if budget < fixed:
            raise SpecserveError(
                f"--gpu-memory-budget {budget_gb} GB is too small: the embeddings and {num_buffers} streaming "
                f"buffers alone need {fixed / 1e9:.2f} GB"
            )
        num_resident = min(arch.num_layers, int((budget - fixed) // layer_bytes))
    offloaded = arch.num_layers - num_resident
    return ResidencyPlan(
        num_resident=num_resident,
        num_offloaded=offloaded,
        layer_bytes=layer_bytes,
        device_bytes=fixed + num_resident * layer_bytes,
        host_bytes=offloaded * layer_bytes,
    )
