"""RMSNorm in one kernel launch instead of eight: y = weight * (x * rsqrt(mean(x^2) + eps)).

    x       [num_tokens, hidden_size]   any float dtype, last dim contiguous
    weight  [hidden_size]               same dtype as x
    returns [num_tokens, hidden_size]   x's dtype

As in the reference, the normalisation runs in float32 and is rounded to x's dtype before the
weight multiplies it (so a bf16 model rounds twice, exactly where the PyTorch ops do). One
program normalises one row; the row must fit one block (hidden sizes up to 16384).

``add_rms_norm`` also does the residual add before it (the decoder's add-then-norm, one launch
instead of two): s = x + residual rounded to x's dtype, as the PyTorch add rounds it, and
y = rms_norm(s); it returns (y, s).
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


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the decoder runs without the fused kernel: (rms_norm_ref(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


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


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"rms_norm wants x [num_tokens, hidden_size] with a contiguous last dim, not {tuple(x.shape)}")
    hidden_size = x.shape[1]
    if weight.shape != (hidden_size,) or weight.dtype != x.dtype or weight.stride(0) != 1:
        raise ValueError(f"rms_norm wants a contiguous weight [{hidden_size}] in {x.dtype}, "
                         f"not {tuple(weight.shape)} {weight.dtype}")
    if hidden_size > MAX_HIDDEN_SIZE:
        raise ValueError(f"rms_norm handles hidden sizes up to {MAX_HIDDEN_SIZE}, not {hidden_size}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See the module docstring; never synchronises with the host (CUDA-graph safe)."""
    _check(x, weight)
    num_tokens, hidden_size = x.shape
    y = torch.empty_like(x)
    if num_tokens == 0:
        return y
    block = triton.next_power_of_2(hidden_size)
    _rms_norm_kernel[(num_tokens,)](
        x, weight, y, x.stride(0), y.stride(0), hidden_size, eps,
        BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )
    return y


@triton.jit
def _add_rms_norm_kernel(
    X, R, W, Y, S,
    stride_x, stride_r, stride_y, stride_s,
    hidden_size, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    summed = (x + r).to(S.dtype.element_ty)  # rounded as the PyTorch add rounds
    tl.store(S + row * stride_s + cols, summed, mask=mask)
    s = summed.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / hidden_size + eps)
    normed = (s * inv_rms).to(Y.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one launch; residual as x (shape and dtype).
    Never synchronises with the host (CUDA-graph safe)."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.dim() != 2 or residual.stride(-1) != 1:
        raise ValueError(f"add_rms_norm wants a residual like x {tuple(x.shape)} {x.dtype} with a contiguous "
                         f"last dim, not {tuple(residual.shape)} {residual.dtype}")
    _check(x, weight)
    y, summed = torch.empty_like(x), torch.empty_like(x)
    num_tokens, hidden_size = x.shape
    if num_tokens == 0:
        return y, summed
    block = triton.next_power_of_2(hidden_size)
    _add_rms_norm_kernel[(num_tokens,)](
        x, residual, weight, y, summed, x.stride(0), residual.stride(0), y.stride(0), summed.stride(0),
        hidden_size, eps, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )
    return y, summed
