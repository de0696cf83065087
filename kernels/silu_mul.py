"""The Llama MLP's gate in one kernel launch instead of two: silu(gate) * up.

    gate_up  [num_tokens, 2 * intermediate_size]   gate_up_proj's output: gate | up
    returns  [num_tokens, intermediate_size]       gate_up's dtype

Rounded where the reference rounds: silu is computed in float32 and rounded to the dtype,
then multiplied by up and rounded again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 1024


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_mul_kernel(GU, OUT, stride_gu, stride_out, intermediate_size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    gate = tl.load(GU + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GU + row * stride_gu + intermediate_size + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty)
    tl.store(OUT + row * stride_out + cols, (silu * up).to(OUT.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """See the module docstring; never synchronises with the host (CUDA-graph safe)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"silu_mul wants gate_up [num_tokens, 2 * intermediate_size], not {tuple(gate_up.shape)}")
    num_tokens, intermediate_size = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(num_tokens, intermediate_size, dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0:
        return out
    grid = (num_tokens, triton.cdiv(intermediate_size, BLOCK))
    _silu_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), intermediate_size, BLOCK=BLOCK, num_warps=4)
    return out
