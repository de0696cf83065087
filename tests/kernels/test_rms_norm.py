"""specserve_kernels.rms_norm against its reference (Triton's interpreter on the CPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from specserve_kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("num_tokens, hidden_size", [(1, 8), (5, 48), (3, 576)])
def test_matches_the_reference_in_float32(num_tokens, hidden_size):
    generator = torch.Generator().manual_seed(num_tokens * hidden_size)
    x = (3 * torch.randn(num_tokens, hidden_size, generator=generator)).to(DEVICE)
    weight = torch.randn(hidden_size, generator=generator).to(DEVICE)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), rtol=2e-6, atol=2e-6)


def test_reads_rows_through_their_stride_and_handles_no_tokens():
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    weight = torch.ones(16, device=DEVICE)
    view = x[:, :16]  # rows 32 apart
    torch.testing.assert_close(rms_norm(view, weight, 1e-6), rms_norm_ref(view, weight, 1e-6), rtol=2e-6, atol=2e-6)
    assert rms_norm(x[:0, :16], weight, 1e-6).shape == (0, 16)


def test_bad_shapes_are_refused():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(4, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(16, device=DEVICE)[::2], 1e-6)
    with pytest.raises(ValueError, match="num_tokens, hidden_size"):
        rms_norm(x[None], torch.ones(8, device=DEVICE), 1e-6)


@pytest.mark.parametrize("num_tokens, hidden_size", [(1, 8), (3, 576)])
def test_add_then_norm_matches_the_reference(num_tokens, hidden_size):
    generator = torch.Generator().manual_seed(hidden_size)
    x, residual = (torch.randn(2, num_tokens, hidden_size, generator=generator) * 3).to(DEVICE)
    weight = torch.randn(hidden_size, generator=generator).to(DEVICE)
    normed, summed = add_rms_norm(x, residual, weight, 1e-5)
    expected_normed, expected_summed = add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(summed, expected_summed)  # one float32 add either way
    torch.testing.assert_close(normed, expected_normed, rtol=2e-6, atol=2e-6)


def test_add_then_norm_refuses_a_residual_unlike_x():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.zeros(2, 4, device=DEVICE), torch.ones(8, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, torch.zeros(2, 8, device=DEVICE, dtype=torch.float64), torch.ones(8, device=DEVICE), 1e-6)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("hidden_size", [576, 4096])
def test_bf16_serving_shapes(hidden_size):
    """On the GPU only: the interpreter's float32 -> bf16 conversion does not round to nearest
    even as the GPU's does, so the bitwise check of the rounded sum cannot run on the CPU."""
    x = torch.randn(64, hidden_size, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(hidden_size, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), rtol=1.6e-2, atol=1e-2)
    residual = torch.randn(64, hidden_size, device="cuda", dtype=torch.bfloat16)
    normed, summed = add_rms_norm(x, residual, weight, 1e-5)
    expected_normed, expected_summed = add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(summed, expected_summed)
    torch.testing.assert_close(normed, expected_normed, rtol=1.6e-2, atol=1e-2)
