"""Chain steps with every level in one graph (``chain_graphs``), on the CPU: the same padded body
as on CUDA, run eagerly. Three drafters of one model take the same steps: ``fused`` (every
level in one body), ``per_level`` (one padded forward per level, ``chain_graphs`` off) and
``loop`` (the generic level-by-level builder loop, ``fast_chain`` off). The fused and per-level
steps share their buckets, so their outputs must agree bit for bit (one thread: see
tests/engine/test_cuda_graphs.py); the loop runs other shapes, so it must agree on the trees."""

import numpy as np
import pytest
import torch

from draft_models.base import DraftRequest
from draft_models.feature_draft import FeatureDraft
from draft_models.feature_drafter import FeatureDrafter
from draft_models.model_drafter import ModelDrafter
from specserve.config import SpeculativeConfig
from specserve.engine.chain_graphs import pack_chain
from specserve.engine.cuda_graphs import GraphBuckets, StaticLayout, pack_step
from specserve.engine.model_runner import TreeBatchItem
from specserve.models.attention import BACKENDS
from specserve.models.config import LlamaArchConfig
from specserve.models.llama import LlamaForCausalLM
from specserve.tree import TokenTree

BLOCK_SIZE = 4
NUM_BLOCKS = 64  # the pool; the drafters' caches hold one more, the dummy block 64
BUCKETS = GraphBuckets(seq_sizes=(1, 2, 4), token_sizes=(1, 2, 4, 8, 16, 32), max_num_blocks=12)
ARCH = LlamaArchConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, max_position_embeddings=256)
TOKEN_CHAIN = SpeculativeConfig(method="early_exit", num_layers=2, tree="chain", top_k=3, max_tree_tokens=12,
                                max_depth=4)
FEATURE_CHAIN = SpeculativeConfig(method="draft", draft_model="unused", tree="chain", top_k=3, max_tree_tokens=12,
                                  max_depth=4)
PROMPTS = {"a": [3, 17, 9, 44, 2, 8, 50], "b": [5, 6, 7, 8, 9], "c": list(range(20, 31))}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomised(model):
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def token_model():
    torch.manual_seed(0)
    return randomised(LlamaForCausalLM(ARCH, BACKENDS["reference"]))


@pytest.fixture(scope="module")
def feature_model():
    torch.manual_seed(1)
    model = randomised(FeatureDraft(LlamaArchConfig(**{**ARCH.__dict__, "num_layers": 1}), BACKENDS["reference"]))
    with torch.no_grad():
        model.fc.weight[:, ARCH.hidden_size :] *= 20  # the state read matters
    return model


def drafters(kind: str, model, buckets: GraphBuckets = BUCKETS, num_blocks: int = NUM_BLOCKS,
             block_size: int = BLOCK_SIZE, max_depth: int = 4, names=("fused", "per_level", "loop")) -> dict:
    """Drafters of ``model`` by name: "fused", "per_level" (chain_graphs off), "loop" (fast_chain off)."""
    config = TOKEN_CHAIN if kind == "token" else FEATURE_CHAIN
    config = SpeculativeConfig(**{**config.__dict__, "max_depth": max_depth})
    out = {}
    for name in names:
        if kind == "token":
            out[name] = ModelDrafter(model, model.cfg.num_layers, config, num_blocks, block_size, graph_buckets=buckets)
        else:
            out[name] = FeatureDrafter(model, config, num_blocks, block_size, graph_buckets=buckets)
        out[name].chain_graphs = None if name == "per_level" else out[name].chain_graphs
        out[name].fast_chain = name != "loop"
    return out


def take_steps(drafters: dict, prompts: dict[str, list[int]], depths: dict[str, int], steps: int = 3) -> dict:
    """``steps`` proposals of every drafter, each accepting the fused tree's first draft plus a
    new token (feature drafts observe fixed random target states); every drafter's trees."""
    generator = torch.Generator().manual_seed(2)
    tokens = {s: list(prompts[s]) for s in depths}
    trees = {name: [] for name in drafters}
    hidden_size, device = drafters["fused"].runner.model.cfg.hidden_size, drafters["fused"].kv_cache.kv.device
    with torch.no_grad():
        if isinstance(drafters["fused"], FeatureDrafter):
            for seq_id, ids in tokens.items():
                states = torch.randn(len(ids) - 1, hidden_size, generator=generator).to(device)
                for drafter in drafters.values():
                    drafter.observe(seq_id, 0, states)
        for step in range(steps):
            requests = [DraftRequest(s, ids, 12, depths[s]) for s, ids in tokens.items()]
            for name, drafter in drafters.items():
                trees[name].append(drafter.propose(requests))
            fresh = torch.randn(2, hidden_size, generator=generator).to(device)
            for (seq_id, ids), tree in zip(list(tokens.items()), trees["fused"][-1]):
                new = list(tree.token_ids[1:2]) + [60 + step]
                if isinstance(drafters["fused"], FeatureDrafter):
                    for drafter in drafters.values():
                        drafter.observe(seq_id, len(ids) - 1, fresh[: len(new)])
                tokens[seq_id] = ids + new
    return trees


def test_pack_chain_writes_what_pack_step_writes_level_by_level():
    """Three sequences in bucket S = 4 (one empty row), T = 8, three levels: every field a level
    reads equals pack_step's for that level's one-token trees."""
    layout = StaticLayout(8, 5, 6)
    tables = {"a": [7, 3, 9, 11], "b": [1, 2], "c": [12, 4, 5, 6]}
    roots = {"a": 9, "b": 4, "c": 12}
    dummy = 40
    padded = np.full((3, 6), dummy, dtype=np.int64)
    for row, table in zip(padded, tables.values()):
        row[: len(table)] = table
    levels = np.full((3, layout.size), -7, dtype=np.int32)
    pack_chain(levels, layout, padded, np.array(list(roots.values())), BLOCK_SIZE, dummy)
    for level in range(3):
        ours = layout.views(levels[level], 4, 8)
        theirs = layout.views(np.zeros(layout.size, dtype=np.int32), 4, 8)
        items = [TreeBatchItem(s, roots[s] + level + 1, TokenTree.chain([0])) for s in tables]
        pack_step(theirs, items, list(tables.values()), BLOCK_SIZE, dummy, [0, 1, 2, 3])
        for name in ("input_ids", "positions", "slot_mapping", "tree_parents", "logit_indices", "prefix_lens",
                     "tree_lens"):
            assert ours[name].tolist() == theirs[name].tolist(), name
        for s, item in enumerate(items):
            num_read = -(-(item.prefix_len + 1) // BLOCK_SIZE)
            assert ours["block_tables"][s, :num_read].tolist() == theirs["block_tables"][s, :num_read].tolist()
        assert ours["block_tables"][3:].tolist() == [[dummy] * 6] * 2  # the empty row and the padding row
    assert ours["slot_mapping"][:3].tolist() == [11 * 4 + 0, 2 * 4 + 3, 6 * 4 + 3]  # positions 12, 7, 15


@pytest.mark.parametrize("kind", ["token", "feature"])
@pytest.mark.parametrize("seqs", ["a", "abc"])
def test_every_level_in_one_body_equals_the_level_by_level_chains(kind, seqs, token_model, feature_model):
    """Chains as deep as each other run fused (the runner ran every step) and give the per-level
    path's trees, path probabilities and draft K/V bit for bit, and the generic loop's trees."""
    group = drafters(kind, token_model if kind == "token" else feature_model)
    trees = take_steps(group, PROMPTS, {s: 4 for s in seqs})
    assert group["fused"].chain_graphs.num_runs == 3 and group["fused"].chain_graphs.num_captured == 0
    assert trees["fused"] == trees["per_level"] == trees["loop"]
    for fused, per_level in zip(trees["fused"], trees["per_level"]):
        assert [t.node_scores for t in fused] == [t.node_scores for t in per_level]
    pool = slice(0, NUM_BLOCKS)  # the dummy block holds padding garbage, which differs
    assert torch.equal(group["fused"].kv_cache.kv[:, :, pool], group["per_level"].kv_cache.kv[:, :, pool])
    first = trees["fused"][0]
    assert [max(t.depths()) for t in first] == [4] * len(seqs)
    assert [t.num_nodes - 1 for t in first] == [12] * len(seqs)  # 3 candidates per level


@pytest.mark.parametrize("kind", ["token", "feature"])
def test_chains_of_different_depths_run_level_by_level(kind, token_model, feature_model):
    group = drafters(kind, token_model if kind == "token" else feature_model)
    trees = take_steps(group, PROMPTS, {"a": 4, "b": 2, "c": 3})
    assert group["fused"].chain_graphs.num_runs == 0
    assert trees["fused"] == trees["per_level"] == trees["loop"]
    assert [max(t.depths()) for t in trees["fused"][0]] == [4, 2, 3]


def test_a_chain_past_the_table_width_runs_level_by_level(token_model):
    """With tables 3 blocks of 4 wide: "c" (roots at 10, 12, 14) reads 4 blocks or more at its
    deepest level and runs level by level; "b" (roots at 4, 6, 8: 2, 3, 3 blocks) fits."""
    narrow = GraphBuckets(seq_sizes=(1, 2, 4), token_sizes=(1, 2, 4, 8, 16, 32), max_num_blocks=3)
    for seq_id, num_runs in (("c", 0), ("b", 3)):
        group = drafters("token", token_model, narrow)
        trees = take_steps(group, PROMPTS, {seq_id: 4})
        assert group["fused"].chain_graphs.num_runs == num_runs
        assert trees["fused"] == trees["per_level"] == trees["loop"]


def test_capture_is_a_no_op_off_cuda(token_model):
    drafter = drafters("token", token_model)["fused"]
    assert drafter.chain_graphs.capture_all(3) == 0 and drafter.chain_graphs.num_captured == 0
    dynamic = SpeculativeConfig(method="early_exit", num_layers=2, tree="dynamic", top_k=3, max_tree_tokens=12,
                                max_depth=4)
    assert ModelDrafter(token_model, 2, dynamic, NUM_BLOCKS, BLOCK_SIZE, graph_buckets=BUCKETS).chain_graphs is None
    assert ModelDrafter(token_model, 2, TOKEN_CHAIN, NUM_BLOCKS, BLOCK_SIZE).chain_graphs is None
