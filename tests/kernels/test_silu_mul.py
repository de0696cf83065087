"""specserve_kernels.silu_mul against its reference (Triton's interpreter on the CPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from specserve_kernels import silu_mul as module  # noqa: E402
from specserve_kernels.silu_mul import silu_mul, silu_mul_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("num_tokens, intermediate_size", [(1, 4), (3, 40), (2, module.BLOCK + 24)])
def test_matches_the_reference_in_float32(num_tokens, intermediate_size):
    generator = torch.Generator().manual_seed(intermediate_size)
    gate_up = (4 * torch.randn(num_tokens, 2 * intermediate_size, generator=generator)).to(DEVICE)
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_ref(gate_up), rtol=2e-6, atol=2e-6)


def test_bad_shapes_are_refused_and_no_tokens_is_empty():
    with pytest.raises(ValueError, match="gate_up"):
        silu_mul(torch.zeros(2, 7, device=DEVICE))
    assert silu_mul(torch.zeros(0, 8, device=DEVICE)).shape == (0, 4)


@gpu
@pytest.mark.gpu
def test_bf16_serving_shape():
    gate_up = torch.randn(64, 2 * 1536, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_ref(gate_up), rtol=1.6e-2, atol=1e-2)
