"""RMSNorm in one kernel launch instead of eight: y = weight * (x * rsqrt(mean(x^2) + eps)).

    x       [num_tokens, hidden_size]   any float dtype, last dim contiguous
    weight  [hidden_size]               same dtype as x
    returns [num_tokens, hidden_size]   x's dtype

As in the reference, the normalisation runs in float32 and is rounded to x's dtype before the
weight multiplies it (so a bf16 model rounds twice, exactly where the PyTorch ops do). One
program normalises one row; the row must fit one block (hidden sizes up to 16384).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN_SIZE = 16384


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """What ``specserve.models.llama.RMSNorm`` runs without the fused kernel."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@triton.jit
def _rms_norm_kernel(
    X, W, Y,
    stride_x, stride_y,
    hidden_size, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden_size + eps)
    normed = (x * inv_rms).to(Y.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See the module docstring; never synchronises with the host (CUDA-graph safe)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"rms_norm wants x [num_tokens, hidden_size] with a contiguous last dim, not {tuple(x.shape)}")
    num_tokens, hidden_size = x.shape
    if weight.shape != (hidden_size,) or weight.dtype != x.dtype or weight.stride(0) != 1:
        raise ValueError(f"rms_norm wants a contiguous weight [{hidden_size}] in {x.dtype}, "
                         f"not {tuple(weight.shape)} {weight.dtype}")
    if hidden_size > MAX_HIDDEN_SIZE:
        raise ValueError(f"rms_norm handles hidden sizes up to {MAX_HIDDEN_SIZE}, not {hidden_size}")
    y = torch.empty_like(x)
    if num_tokens == 0:
        return y
    block = triton.next_power_of_2(hidden_size)
    _rms_norm_kernel[(num_tokens,)](
        x, weight, y, x.stride(0), y.stride(0), hidden_size, eps,
        BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )
    return y
