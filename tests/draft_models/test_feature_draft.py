"""Feature-level (EAGLE-style) drafts: the unrolled training forward against the paged drafter,
the states the engine hands over, save/load, and greedy output unchanged."""

import copy

import pytest
import torch

from draft_models.base import DraftRequest
from draft_models.dense_forward import causal_hidden, feature_passes, pass_mask
from draft_models.feature_draft import FeatureDraft
from draft_models.feature_drafter import FeatureDrafter
from draft_models.small_draft import (
    DraftSpec,
    build_draft_model,
    load_draft,
    own_tensors,
    save_draft,
)
from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SpeculationParams,
    SpeculativeConfig,
)
from specserve.engine.cuda_graphs import GraphBuckets
from specserve.engine.llm_engine import LLMEngine
from specserve.errors import SpecserveError
from specserve.models.attention import BACKENDS
from specserve.models.loader import load_model
from tests.models.test_llama_vs_transformers import save_with_tokenizer
from tests.models.tiny import tiny_hf_model

SPEC = DraftSpec(num_layers=1, feature_input=True)
CHAIN = SpeculativeConfig(method="draft", draft_model="unused", max_tree_tokens=3, max_depth=3, widths=(1, 1, 1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_files):  # noqa: F811
    folder = save_with_tokenizer(tiny_hf_model("llama", seed=5, num_hidden_layers=3), tmp_path_factory.mktemp("t") / "m",
                                 tokenizer_files)
    return load_model(ModelConfig(model=str(folder), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def draft(tiny):
    """A random 1-layer feature draft whose state half of ``fc`` matters (scaled up)."""
    model = build_draft_model(SPEC, tiny, seed=3)
    with torch.no_grad():
        model.fc.weight[:, tiny.arch.hidden_size :] *= 20
    return model


def test_pass_mask_rows():
    """Pass 3 at position 4 (root 2): pass-1 keys 0..2, pass 2's key at 3, its own at 4."""
    mask = pass_mask(3, 6, torch.device("cpu")).int()
    assert mask.shape == (6, 18)
    assert mask[4].tolist() == [1, 1, 1, 0, 0, 0] + [0, 0, 0, 1, 0, 0] + [0, 0, 0, 0, 1, 0]
    assert mask[0].tolist() == [0] * 6 + [0] * 6 + [1, 0, 0, 0, 0, 0]  # no root: only itself
    assert pass_mask(1, 4, torch.device("cpu")).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_build_and_spec_rules(tiny, draft):
    assert isinstance(draft, FeatureDraft) and draft.embed_tokens.weight is tiny.model.embed_tokens.weight
    hidden = tiny.arch.hidden_size
    assert torch.equal(draft.fc.weight[:, :hidden], torch.eye(hidden)) and not draft.fc.bias.any()
    assert {"fc.weight", "fc.bias"} <= own_tensors(draft, SPEC).keys()
    for bad in ({"hidden_size": 32}, {"shares_embedding": False}):
        with pytest.raises(SpecserveError, match="feature draft"):
            DraftSpec(num_layers=1, feature_input=True, **bad)


def dense_greedy_chain(draft, tokens, states, root, depth):
    """The chain a greedy drafter grows from ``root``, computed with the unrolled dense passes
    (depth d's token is the argmax of pass d at position root + d - 1), and the predicted
    state of each node but the last."""
    tokens, predicted = list(tokens[: root + 1]), []
    for d in range(1, depth + 1):
        ids = torch.tensor([tokens])
        padded = torch.zeros(1, len(tokens), states.shape[1])
        padded[0, :root] = states[:root]  # the target's states exist up to root - 1 only
        passes = feature_passes(draft, ids, padded, d)
        predicted.append(passes[d - 1][0, root + d - 1])
        tokens.append(int(draft.compute_logits(predicted[-1]).argmax()))
    return tokens[root:], predicted


def test_drafter_chain_equals_the_unrolled_dense_passes(draft):
    """What the paged drafter proposes (catch-up with real states, then each depth reading its
    parent's prediction) is what training unrolls, depth by depth; and a rollback to an
    accepted path gives the same as a fresh drafter."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 120, (14,), generator=generator).tolist()
    states = torch.randn(14, draft.cfg.hidden_size, generator=generator)
    with torch.no_grad():
        for root in (6, 9):
            fresh = FeatureDrafter(draft, CHAIN, num_blocks=32, block_size=4)
            fresh.observe("s", 0, states[:root])
            (tree,) = fresh.propose([DraftRequest("s", tokens[: root + 1], 3, 3)])
            chain, predicted = dense_greedy_chain(draft, tokens, states, root, 3)
            assert list(tree.token_ids) == chain and list(tree.parents) == [-1, 0, 1, 2]
            for node, expected in enumerate(predicted):  # builder nodes 0, 1, 2: the root and depths 1, 2
                torch.testing.assert_close(fresh._predicted["s"][node], expected, rtol=0, atol=1e-5)
        # the same drafter, stepped: propose at 6, then the target commits 6..8 and proposes at 9
        stepped = FeatureDrafter(draft, CHAIN, num_blocks=32, block_size=4)
        stepped.observe("s", 0, states[:6])
        stepped.propose([DraftRequest("s", tokens[:7], 3, 3)])
        assert stepped.states["s"][0] == 6  # the next catch-up reads from the root on
        stepped.observe("s", 6, states[6:9])
        (again,) = stepped.propose([DraftRequest("s", tokens[:10], 3, 3)])
    assert again == tree


def test_padded_steps_propose_the_same_trees_and_states(draft):
    """With graph buckets (padded steps from static buffers; a CUDA graph on CUDA, eager here)
    the drafter reads its states through the runner's feature buffer: same trees, same
    predicted states, step after step, as the unpadded drafter."""
    buckets = GraphBuckets(seq_sizes=(1, 2, 4), token_sizes=(4, 8, 16, 32), max_num_blocks=16)
    dynamic = SpeculativeConfig(method="draft", draft_model="unused", tree="dynamic", top_k=2, max_tree_tokens=6,
                                max_depth=3)
    generator = torch.Generator().manual_seed(1)
    tokens = {s: torch.randint(3, 120, (n,), generator=generator).tolist() for s, n in (("a", 9), ("b", 5))}
    states = {s: torch.randn(len(t), draft.cfg.hidden_size, generator=generator) for s, t in tokens.items()}
    draft = copy.copy(draft)  # the same weights on the reference attention (padding wants no host-built plan)
    draft.attention = BACKENDS["reference"]
    drafters = [FeatureDrafter(draft, dynamic, num_blocks=64, block_size=4, graph_buckets=b) for b in (None, buckets)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise padded-vs-unpadded matmuls (tests/engine/test_cuda_graphs.py)
    try:
        run_both(drafters, tokens, states, generator)
    finally:
        torch.set_num_threads(threads)
    graphs = drafters[1].runner.graphs
    assert graphs.features is not None and len(graphs.forwards) >= 3 and graphs.num_captured == 0


@pytest.mark.parametrize("padded", [False, True])
def test_chain_on_the_device_equals_the_level_by_level_loop(draft, padded):
    """tree="chain": each chain token reads its parent's predicted state straight from the
    previous level's output, with no read-back between levels; same trees as the generic loop,
    step after step, unpadded and padded."""
    buckets = GraphBuckets(seq_sizes=(1, 2, 4), token_sizes=(4, 8, 16, 32), max_num_blocks=16) if padded else None
    chain = SpeculativeConfig(method="draft", draft_model="unused", tree="chain", top_k=3, max_tree_tokens=9,
                              max_depth=3)
    draft = copy.copy(draft)
    draft.attention = BACKENDS["reference"]
    drafters = [FeatureDrafter(draft, chain, num_blocks=64, block_size=4, graph_buckets=buckets) for _ in range(2)]
    drafters[1].fast_chain = False
    generator = torch.Generator().manual_seed(2)
    tokens = {s: torch.randint(3, 120, (n,), generator=generator).tolist() for s, n in (("a", 9), ("b", 5))}
    states = {s: torch.randn(len(t), draft.cfg.hidden_size, generator=generator) for s, t in tokens.items()}
    results = [[], []]
    with torch.no_grad():
        for drafter in drafters:
            for seq_id, seq_states in states.items():
                drafter.observe(seq_id, 0, seq_states[:-1])
        for step in range(3):
            requests = [DraftRequest(seq_id, ids, 9, 3 if seq_id == "a" else 2) for seq_id, ids in tokens.items()]
            for result, drafter in zip(results, drafters):
                result.append(drafter.propose(requests))
            fresh = torch.randn(2, draft.cfg.hidden_size, generator=generator)
            for (seq_id, ids), tree in zip(list(tokens.items()), results[0][-1]):
                new = list(tree.token_ids[1:2]) + [30 + step]
                for drafter in drafters:
                    drafter.observe(seq_id, len(ids) - 1, fresh[: len(new)])
                tokens[seq_id] = ids + new
    assert results[0] == results[1]
    assert [t.num_nodes - 1 for t in results[0][0]] == [9, 6]


def run_both(drafters, tokens, states, generator):
    """Three propose/observe steps of both drafters; every tree and predicted state equal."""
    with torch.no_grad():
        for drafter in drafters:
            for seq_id, seq_states in states.items():
                drafter.observe(seq_id, 0, seq_states[:-1])
        for step in range(3):
            requests = [DraftRequest(seq_id, ids, 6, 3) for seq_id, ids in tokens.items()]
            trees = [drafter.propose(requests) for drafter in drafters]
            assert trees[0] == trees[1]
            for seq_id in tokens:
                eager, padded = (d._predicted[seq_id] for d in drafters)
                assert eager.keys() == padded.keys()
                for node in eager:
                    torch.testing.assert_close(padded[node], eager[node], rtol=0, atol=1e-6)
            for (seq_id, ids), tree in zip(tokens.items(), trees[0]):
                new = list(tree.token_ids[1:2]) + [30 + step]
                fresh = torch.randn(len(new), states["a"].shape[1], generator=generator)
                for drafter in drafters:
                    drafter.observe(seq_id, len(ids) - 1, fresh)
                tokens[seq_id] = ids + new


def test_observe_overwrites_later_positions_and_reads_zeros_where_unknown(draft):
    drafter = FeatureDrafter(draft, CHAIN, num_blocks=8, block_size=4)
    hidden = draft.cfg.hidden_size
    drafter.observe("s", 2, torch.ones(3, hidden))  # positions 2, 3, 4
    drafter.observe("s", 4, torch.full((2, hidden), 2.0))  # 4, 5 replace
    drafter.observe("s", 8, torch.full((1, hidden), 3.0))  # 6, 7 unknown
    reads = drafter._reads("s", 0, 10)[:, 0].tolist()
    assert reads == [0, 0, 1, 1, 2, 2, 0, 0, 3, 0]
    drafter.observe("s", 0, torch.full((1, hidden), 5.0))  # a recompute from the start
    assert drafter._reads("s", 0, 3)[:, 0].tolist() == [5, 0, 0]
    drafter.release("s")
    assert "s" not in drafter.states


def test_engine_hands_over_the_targets_states_and_greedy_is_unchanged(tiny, draft, tmp_path):
    folder = save_draft(draft, SPEC, tmp_path / "feature", {"note": "test"}, tiny)
    assert isinstance(load_draft(folder, tiny), FeatureDraft)
    prompt = [5, 9, 14, 33, 2, 71, 8, 19, 4]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64)), loaded=tiny).generate([prompt], params)[0]
    spec = SpeculativeConfig(method="draft", draft_model=str(folder), tree="dynamic", top_k=2, max_tree_tokens=6,
                             max_depth=3, switch_off=False)
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64, enable_prefix_caching=False), speculative=spec),
                       loaded=tiny)
    assert isinstance(engine.drafter, FeatureDrafter)
    engine.add_request(prompt, params, request_id="r")
    engine.step()  # the prefill: the drafter now holds the prompt's states
    start, states = engine.drafter.states["r"]
    expected = causal_hidden(tiny.model, torch.tensor([prompt]))[0]
    assert start == 0 and torch.allclose(states, expected, atol=1e-5)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    assert outs[0].token_ids == plain.token_ids
    assert outs[0].num_draft_tokens > 0


def test_merged_with_ngram_through_the_engine(tiny, draft, tmp_path):
    """A merge naming a trained draft by folder (``draft:PATH``) and the ngram drafter: greedy
    output unchanged, the feature draft fed through the merge, and a request may keep to
    either kind ("draft" or "ngram")."""
    folder = save_draft(draft, SPEC, tmp_path / "feature", {"note": "test"}, tiny)
    prompt = [5, 9, 14, 33, 2, 71, 8, 19, 4, 5, 9, 14]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    plain = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64)), loaded=tiny).generate([prompt], params)[0]
    spec = SpeculativeConfig(method="merge", merge=(f"draft:{folder}", "ngram"), tree="dynamic", top_k=2,
                             max_tree_tokens=8, max_depth=3, switch_off=False)
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=96), speculative=spec), loaded=tiny)
    assert engine.resolve_speculation(None).drafters == ("draft", "ngram")
    out = engine.generate([prompt], params)[0]
    assert out.token_ids == plain.token_ids and out.num_draft_tokens > 0
    for kind in ("draft", "ngram"):
        only = engine.resolve_speculation(SpeculationParams(drafters=(kind,)))
        assert only.drafters == (kind,)
        engine.add_request(prompt, params, request_id=kind, speculation=SpeculationParams(drafters=(kind,)))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    assert all(o.token_ids == plain.token_ids for o in outs) and len(outs) == 2
