"""How many layers fit on the device under a memory budget for weights, and how many working
buffers the streamed layers rotate through.

    budget >= outside_layers + (num_resident + B) * layer_bytes
    outside_layers = embeddings (+ untied LM head) + final norm;  + B: the streaming buffers (B >= 2)

B buffers let a pass's first B - 1 streamed layers be copied while the host works between
passes (``offload.offloaded_model``). Left to the planner: under a budget B = 2, since a buffer
more would displace a resident layer, whose copy every pass saves outright, while a prefetched
layer only hides host time; with every layer streamed, B - 1 layers cover ``PREFETCH_BYTES``
(about a millisecond of copying; at least one layer, and fewer than all but for a one-layer
model). SmolLM2-135M in bf16
(7.1 MB layers) gets 9, the count measured best on the H200 (bench/README.md, "Offloading at
4x").
"""

from __future__ import annotations

import math
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
    num_buffers: int  # device working buffers the streamed layers rotate through


# bytes of streamed layers worth copying ahead of a pass: the host's work between two passes
# (about 1 ms with speculation, bench/results/offload_steps_h200.log) at the ~55 GB/s measured
PREFETCH_BYTES = 56 * 10**6


def layer_numel(arch: LlamaArchConfig) -> int:
    attention = arch.hidden_size * (arch.q_size + 2 * arch.kv_size) + arch.q_size * arch.hidden_size
    if arch.attention_bias:
        attention += arch.q_size + 2 * arch.kv_size
    if arch.o_proj_bias:
        attention += arch.hidden_size
    return attention + 3 * arch.hidden_size * arch.intermediate_size + 2 * arch.hidden_size


def plan_residency(arch: LlamaArchConfig, dtype: torch.dtype, budget_gb: float | None,
                   num_buffers: int | None = None) -> ResidencyPlan:
    """``budget_gb`` None: nothing resident (every layer streamed). ``num_buffers`` working
    buffers are counted against the budget; None: chosen as the module docstring says."""
    element = torch.empty((), dtype=dtype).element_size()
    layer_bytes = layer_numel(arch) * element
    if num_buffers is None:
        prefetched = min(arch.num_layers - 1, math.ceil(PREFETCH_BYTES / layer_bytes))
        num_buffers = 2 if budget_gb is not None else max(2, 1 + prefetched)
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
        num_buffers=num_buffers,
    )
