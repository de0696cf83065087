"""On CUDA: chain steps with every level in one captured graph (``chain_graphs``) against one
graph per level (the ``GraphRunner`` path), random tiny drafts on the Triton backend: the same
trees, path probabilities and draft K/V; the replay never synchronises; and the time of a
depth-8 chain step for one sequence, printed. Skipped without a GPU.

    pytest -m gpu -s tests/engine/test_chain_graphs_gpu.py
"""

import statistics
import time

import pytest
import torch

from draft_models.base import DraftRequest
from draft_models.feature_draft import FeatureDraft
from specserve.engine.cuda_graphs import GraphBuckets
from specserve.models.attention import BACKENDS
from specserve.models.config import LlamaArchConfig
from specserve.models.llama import LlamaForCausalLM
from specserve.models.rope import rope_cos_sin
from tests.engine.test_chain_graphs import PROMPTS, drafters, take_steps

pytestmark = pytest.mark.gpu
BLOCK_SIZE, NUM_BLOCKS = 16, 128
BUCKETS = GraphBuckets(seq_sizes=(1, 2, 4, 8), token_sizes=(1, 2, 4, 8, 16, 32, 64, 128), max_num_blocks=16)
ARCH = LlamaArchConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=64, max_position_embeddings=1024)


def build(kind: str, dtype: torch.dtype):
    torch.manual_seed(0)
    arch = ARCH if kind == "token" else LlamaArchConfig(**{**ARCH.__dict__, "num_layers": 1})
    model = (LlamaForCausalLM if kind == "token" else FeatureDraft)(arch, BACKENDS["triton"])
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model = model.to("cuda", dtype).eval()
    model.cos_sin = rope_cos_sin(arch.max_position_embeddings, arch.head_dim, arch.rope_theta,
                                 arch.rope_scaling).to("cuda")  # float32, as the loader keeps it
    return model


def group(kind: str, dtype: torch.dtype, names=("fused", "per_level")) -> dict:
    return drafters(kind, build(kind, dtype), BUCKETS, NUM_BLOCKS, BLOCK_SIZE, max_depth=8, names=names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["token", "feature"])
@pytest.mark.parametrize("seqs", ["a", "abc"])  # PROMPTS has a, b and c
def test_one_graph_for_every_level_equals_a_graph_per_level(kind, dtype, seqs):
    drafters_ = group(kind, dtype)
    chain = drafters_["fused"].chain_graphs
    assert chain.num_captured == len(BUCKETS.seq_sizes)  # (S, 7) for every S, at start-up
    trees = take_steps(drafters_, PROMPTS, {s: 8 for s in seqs})
    assert chain.num_runs == 3 and chain.num_captured == len(BUCKETS.seq_sizes)
    assert trees["fused"] == trees["per_level"]
    for fused, per_level in zip(trees["fused"], trees["per_level"]):
        for a, b in zip(fused, per_level):
            torch.testing.assert_close(torch.tensor(a.node_scores), torch.tensor(b.node_scores), rtol=1e-5, atol=1e-7)
    exact = all([t.node_scores for t in f] == [t.node_scores for t in p]
                for f, p in zip(trees["fused"], trees["per_level"]))
    kv = [d.kv_cache.kv[:, :, :NUM_BLOCKS] for d in drafters_.values()]
    print(f"\n{kind} {dtype} n={len(seqs)}: path probabilities bitwise equal: {exact}, "
          f"draft K/V equal: {torch.equal(*kv)}")
    if dtype == torch.float32:  # bf16: printed only (the two paths may round apart)
        assert torch.equal(*kv)


def test_the_chain_replay_never_synchronises():
    drafter = group("token", torch.float32, names=("fused",))["fused"]
    drafter.propose([DraftRequest("a", PROMPTS["a"], 12, 8)])  # registers "a", slots past the root
    first_ids = torch.zeros(1, dtype=torch.int64, device="cuda")
    root = len(PROMPTS["a"]) - 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        values, ids = drafter.chain_graphs.run(["a"], [root], 7, first_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert values.shape == ids.shape == (7, 1, 3)


@pytest.mark.parametrize("kind", ["token", "feature"])
def test_depth_8_chain_step_time(kind):
    """Prints the median wall time of a whole propose (catch-up, 7 levels, read-back) for one
    sequence, fused and per level, and of the fused levels alone (run + read-back)."""
    drafters_ = group(kind, torch.bfloat16)
    times = {name: [] for name in drafters_}
    tokens = list(PROMPTS["a"])
    with torch.no_grad():
        for drafter in drafters_.values():
            if kind == "feature":
                drafter.observe("a", 0, torch.randn(len(tokens) - 1, ARCH.hidden_size, device="cuda"))
        for step in range(40):
            request = [DraftRequest("a", tokens, 12, 8)]
            for name, drafter in drafters_.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                drafter.propose(request)
                times[name].append(time.perf_counter() - start)
            tokens = tokens + [7 + step % 50]
            for drafter in drafters_.values():
                if kind == "feature":
                    drafter.observe("a", len(tokens) - 2, torch.randn(1, ARCH.hidden_size, device="cuda"))
        chain, root = drafters_["fused"].chain_graphs, len(tokens) - 2
        first_ids, states = torch.zeros(1, dtype=torch.int64, device="cuda"), None
        if kind == "feature":
            states = torch.zeros(1, ARCH.hidden_size, device="cuda", dtype=torch.bfloat16)
        levels = []
        for _ in range(40):
            torch.cuda.synchronize()
            start = time.perf_counter()
            values, ids = chain.run(["a"], [root], 7, first_ids, states)
            values.tolist(), ids.tolist()
            levels.append(time.perf_counter() - start)
    medians = {name: statistics.median(t[5:]) * 1e3 for name, t in times.items()}
    print(f"\n{kind}, depth 8, batch 1 (bf16, tiny random draft): propose fused {medians['fused']:.3f} ms, "
          f"per level {medians['per_level']:.3f} ms; the 7 fused levels + read-back "
          f"{statistics.median(levels[5:]) * 1e3:.3f} ms")  # timings reported, not asserted (noise)
