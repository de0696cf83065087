"""specserve_kernels.rope_kv against its reference: rotated q, and the cache after the K/V write
(Triton's interpreter on the CPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from specserve.models.config import RopeScaling  # noqa: E402
from specserve.models.rope import rope_cos_sin  # noqa: E402
from specserve_kernels.rope_kv import rope_kv, rope_kv_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def case(num_tokens, num_heads, num_kv_heads, head_dim, dtype, seed, num_blocks=6, block_size=4):
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    positions = torch.randint(0, 100, (num_tokens,), generator=generator)
    cos_sin = rope_cos_sin(128, head_dim, 10000.0, RopeScaling())[positions].to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens].to(DEVICE)
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), 7.0, dtype=dtype, device=DEVICE)
    return qkv, cos_sin, cache, slots


@pytest.mark.parametrize("num_tokens, num_heads, num_kv_heads, head_dim", [(1, 2, 1, 8), (5, 4, 2, 16), (3, 3, 3, 4)])
def test_matches_the_reference_in_float32(num_tokens, num_heads, num_kv_heads, head_dim):
    qkv, cos_sin, cache, slots = case(num_tokens, num_heads, num_kv_heads, head_dim, torch.float32, head_dim)
    ref_cache = cache.clone()
    q = rope_kv(qkv, cos_sin, cache[0], cache[1], slots, num_heads, num_kv_heads)
    q_ref = rope_kv_ref(qkv, cos_sin, ref_cache[0], ref_cache[1], slots, num_heads, num_kv_heads)
    torch.testing.assert_close(q, q_ref, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(cache, ref_cache, rtol=2e-6, atol=2e-6)
    untouched = torch.ones(cache.shape[1] * cache.shape[2], dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert (cache.flatten(1, 2)[:, untouched.to(DEVICE)] == 7.0).all()  # nothing written outside the slots


def test_bad_inputs_are_refused():
    qkv, cos_sin, cache, slots = case(2, 2, 1, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="qkv"):
        rope_kv(qkv[:, :-8], cos_sin, cache[0], cache[1], slots, 2, 1)
    with pytest.raises(ValueError, match="power-of-two"):
        rope_kv(qkv, cos_sin[:, :6], cache[0], cache[1], slots, 2, 1)
    with pytest.raises(ValueError, match="k_cache"):
        rope_kv(qkv, cos_sin, cache[0].transpose(0, 1), cache[1], slots, 2, 1)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_kv(qkv, cos_sin, cache[0], cache[1], slots.int(), 2, 1)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_kv(qkv, cos_sin, cache[0], cache[1], torch.stack([slots, slots], 1)[:, 0], 2, 1)


def test_reads_qkv_rows_through_their_stride():
    qkv, cos_sin, cache, slots = case(3, 2, 1, 8, torch.float32, 5)
    wide = torch.zeros(3, qkv.shape[1] + 8, device=DEVICE)
    wide[:, : qkv.shape[1]] = qkv
    ref_cache = cache.clone()
    q = rope_kv(wide[:, : qkv.shape[1]], cos_sin, cache[0], cache[1], slots, 2, 1)
    torch.testing.assert_close(q, rope_kv_ref(qkv, cos_sin, ref_cache[0], ref_cache[1], slots, 2, 1))
    torch.testing.assert_close(cache, ref_cache)


@gpu
@pytest.mark.gpu
def test_bf16_serving_shape():
    qkv, cos_sin, cache, slots = case(64, 9, 3, 64, torch.bfloat16, 1, num_blocks=8, block_size=16)
    ref_cache = cache.clone()
    q = rope_kv(qkv, cos_sin, cache[0], cache[1], slots, 9, 3)
    q_ref = rope_kv_ref(qkv, cos_sin, ref_cache[0], ref_cache[1], slots, 9, 3)
    torch.testing.assert_close(q, q_ref, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(cache, ref_cache, rtol=1.6e-2, atol=1e-2)
