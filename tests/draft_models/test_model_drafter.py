"""Model drafters (early exit, and the machinery trained drafts use) on a tiny random model."""

import pytest
import torch

from draft_models.base import DraftRequest
from draft_models.model_drafter import ModelDrafter
from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.models.loader import load_model
from tests.models.test_llama_vs_transformers import save_with_tokenizer
from tests.models.tiny import tiny_hf_model

CHAIN = SpeculativeConfig(method="early_exit", max_tree_tokens=4, max_depth=4, widths=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_files):  # noqa: F811
    folder = save_with_tokenizer(tiny_hf_model("llama", seed=5, num_hidden_layers=3), tmp_path_factory.mktemp("t") / "m",
                                 tokenizer_files)
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu"))


def greedy(loaded, prompt, n):
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64)), loaded=loaded)
    return engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].token_ids


def test_drafter_with_every_layer_proposes_the_greedy_continuation(tiny):
    prompt = [3, 17, 9, 44, 2, 8, 100]
    expected = greedy(tiny, prompt, 6)
    drafter = ModelDrafter(tiny.model, tiny.arch.num_layers, CHAIN, num_blocks=32, block_size=4)
    (tree,) = drafter.propose([DraftRequest("s", prompt + expected[:1], 4, 4)])
    assert tree == tree.chain([expected[0], *expected[1:5]])


def test_engine_accepts_every_draft_of_a_full_depth_drafter(tiny):
    prompt = [5, 6, 7, 8, 9]
    # switch_off off: a drafter as deep as the target costs what it saves, and would be switched off
    every_layer = SpeculativeConfig(**{**CHAIN.__dict__, "num_layers": tiny.arch.num_layers, "switch_off": False})
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64), speculative=every_layer), loaded=tiny)
    out = engine.generate([prompt], SamplingParams(max_tokens=21, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == greedy(tiny, prompt, 21)
    assert out.accepted_per_depth == [4, 4, 4, 4]  # 4 steps x (4 drafts + 1 bonus) after the first token
    assert out.mean_accepted_length == 5.0


def test_rollback_leaves_draft_kv_equal_to_a_fresh_prefill(tiny):
    drafter = ModelDrafter(tiny.model, 2, CHAIN, num_blocks=64, block_size=4)
    tokens = [11, 12, 13, 14, 15, 16]
    for step, accepted in enumerate([[40, 41], [], [42, 43, 44]]):
        (tree,) = drafter.propose([DraftRequest("s", tokens, 4, 4)])
        assert tree.num_nodes - 1 <= 4
        tokens = tokens + accepted + [50 + step]  # the target keeps some drafts and adds its bonus
        drafter.commit("s", len(tokens) - 1)
    drafter.propose([DraftRequest("s", tokens, 4, 4)])
    fresh = ModelDrafter(tiny.model, 2, CHAIN, num_blocks=64, block_size=4)
    fresh.propose([DraftRequest("s", tokens, 4, 4)])
    assert drafter.num_cached["s"] == fresh.num_cached["s"] == len(tokens)
    positions = range(len(tokens))
    ours = torch.stack([drafter.kv_cache.kv.view(2, 2, -1, 4, 8)[:, :, drafter.kv_manager.slot("s", p)] for p in positions])
    theirs = torch.stack([fresh.kv_cache.kv.view(2, 2, -1, 4, 8)[:, :, fresh.kv_manager.slot("s", p)] for p in positions])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    drafter.release("s")
    assert drafter.kv_manager.pool.num_free_blocks == 64


def chain_steps(drafter, tokens: dict[str, list[int]], depths: dict[str, int], steps: int = 3) -> list:
    """``steps`` proposals for every sequence, each step accepting the tree's first draft (if
    any) plus a new token; the trees of every step."""
    trees = []
    for step in range(steps):
        requests = [DraftRequest(s, ids, 12, depths[s]) for s, ids in tokens.items()]
        trees.append(drafter.propose(requests))
        for (s, ids), tree in zip(list(tokens.items()), trees[-1]):
            tokens[s] = ids + list(tree.token_ids[1:2]) + [60 + step]
    return trees


@pytest.mark.parametrize("padded", [False, True])
def test_chain_trees_drafted_on_the_device_equal_the_level_by_level_loop(tiny, padded):
    """tree="chain" runs the chain's tokens one level per forward with no read-back between
    levels (each level's token taken on the device): the trees equal those of the generic
    loop that recomputes root-to-frontier paths, for sequences of different depths, step after
    step (rollback included), unpadded and padded (a CUDA graph on CUDA, eager here)."""
    from specserve.engine.cuda_graphs import GraphBuckets
    from specserve.models.attention import BACKENDS

    chain = SpeculativeConfig(method="early_exit", num_layers=2, tree="chain", top_k=3, max_tree_tokens=12, max_depth=4)
    buckets = GraphBuckets(seq_sizes=(1, 2, 4), token_sizes=(4, 8, 16, 32), max_num_blocks=16) if padded else None
    model = tiny.model
    if padded:  # padding wants attention without a host-built plan
        import copy

        model = copy.copy(model)
        model.attention = BACKENDS["reference"]
    drafters = [ModelDrafter(model, 2, chain, num_blocks=64, block_size=4, graph_buckets=buckets) for _ in range(2)]
    drafters[1].fast_chain = False
    depths = {"a": 4, "b": 2, "c": 1}
    results = []
    for drafter in drafters:
        tokens = {"a": [3, 17, 9, 44, 2, 8, 100], "b": [5, 6, 7, 8, 9], "c": list(range(20, 31))}
        results.append(chain_steps(drafter, tokens, depths))
    assert results[0] == results[1]
    first = results[0][0]
    assert [max(t.depths()) for t in first] == [4, 2, 1]
    assert [t.num_nodes - 1 for t in first] == [12, 6, 3]  # 3 candidates per level


SPECS = {
    "ngram": SpeculativeConfig(method="ngram", max_tree_tokens=6, max_depth=3),
    "early_exit-static": SpeculativeConfig(method="early_exit", num_layers=1, max_tree_tokens=6, max_depth=3, widths=(2, 2, 1)),
    "early_exit-dynamic": SpeculativeConfig(method="early_exit", num_layers=2, tree="dynamic", top_k=3, max_tree_tokens=6, max_depth=3),
    "early_exit-chain": SpeculativeConfig(method="early_exit", num_layers=2, tree="chain", top_k=3, max_tree_tokens=6, max_depth=4),
    "merge": SpeculativeConfig(method="merge", merge=("ngram", "early_exit"), num_layers=2, max_tree_tokens=6, max_depth=3, widths=(2, 1, 1)),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_drafter_keeps_greedy_output_identical(tiny, name):
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 12, 9, 10, 11, 12, 9], [3], list(range(20, 60))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64)), loaded=tiny).generate(prompts, params)
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64), speculative=SPECS[name]), loaded=tiny)
    spec = engine.generate(prompts, params)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert sum(o.num_draft_tokens for o in spec) > 0
    assert engine.kv_manager.pool.num_free_blocks == 64
    drafters = getattr(engine.drafter, "drafters", [engine.drafter])
    for drafter in drafters:
        if isinstance(drafter, ModelDrafter):
            assert drafter.kv_manager.pool.num_free_blocks == drafter.kv_manager.pool.num_blocks
