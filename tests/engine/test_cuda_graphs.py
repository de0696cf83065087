"""Padded (CUDA-graph) steps on the CPU: the same code path as on CUDA with capture a no-op.

A padded step must give the real rows exactly the unpadded step's logits, leave every real
sequence's K/V identical, and write the padding rows' K/V only into the dummy block.

Exactness needs the unpadded step itself to be row-independent: the CPU GEMM takes another
kernel below 4 rows, so unpadded steps of 1-3 tokens (other than the 1-token bucket) agree
with their padded forms only to rounding; the exact tests use at least 4 real tokens.
"""

import argparse

import numpy as np
import pytest
import torch

from draft_models.base import DraftRequest
from draft_models.model_drafter import ModelDrafter
from specserve.cache.kv_cache import KVCache
from specserve.cache.kv_cache_manager import KVCacheManager
from specserve.cli.args import add_engine_args, engine_config_from_args
from specserve.config import EngineConfig, ModelConfig, SpeculativeConfig
from specserve.engine.cuda_graphs import GraphBuckets, StaticLayout, graph_buckets_for, pack_step
from specserve.engine.model_runner import ModelRunner, TreeBatchItem
from specserve.models.attention import BACKENDS
from specserve.models.config import LlamaArchConfig
from specserve.models.llama import LlamaForCausalLM
from specserve.models.loader import LoadedModel
from specserve.tree import TokenTree
from specserve_kernels.tree_attention import LaunchConfig, launch_tree_attention

BLOCK_SIZE = 4
NUM_BLOCKS = 32  # the pool; the caches hold one more, the dummy block 32
DUMMY = NUM_BLOCKS
BUCKETS = GraphBuckets(seq_sizes=(1, 2, 4, 8), token_sizes=(1, 2, 4, 8, 16), max_num_blocks=8)
ARCH = LlamaArchConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, max_position_embeddings=256)


@pytest.fixture(autouse=True)
def one_thread():
    """Bitwise comparisons of padded and unpadded CPU matmuls hold for one thread: with several,
    how BLAS splits the rows depends on the row count and the last bits can differ."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(ARCH, BACKENDS["reference"])
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


class Pair:
    """The same sequences over two identical caches: one runner eager, one padded."""

    def __init__(self, model, prompts: dict[str, list[int]]):
        self.manager = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=False)
        caches = [KVCache(ARCH.num_layers, NUM_BLOCKS + 1, BLOCK_SIZE, ARCH.num_kv_heads, ARCH.head_dim,
                          torch.float32, torch.device("cpu")) for _ in range(2)]
        self.eager = ModelRunner(model, caches[0], self.manager)
        self.padded = ModelRunner(model, caches[1], self.manager, graph_buckets=BUCKETS)
        self.lengths = {}
        for seq_id, prompt in prompts.items():  # prefill eagerly, then copy the cache
            self.manager.add_sequence(seq_id, prompt)
            self.manager.allocate_slots(seq_id, 0, len(prompt))
            self.eager.run([TreeBatchItem(seq_id, 0, TokenTree.chain(prompt))], [len(prompt) - 1])
            self.lengths[seq_id] = len(prompt)
        caches[1].kv.copy_(caches[0].kv)

    def step(self, trees: dict[str, TokenTree]) -> tuple[torch.Tensor, torch.Tensor, list[TreeBatchItem]]:
        items = []
        for seq_id, tree in trees.items():
            self.manager.allocate_slots(seq_id, self.lengths[seq_id], tree.num_nodes)
            items.append(TreeBatchItem(seq_id, self.lengths[seq_id], tree))
        rows = list(range(sum(tree.num_nodes for tree in trees.values())))
        eager, _ = self.eager.run(items, rows)
        padded, _ = self.padded.run(items, rows)
        return eager, padded, items

    def kv(self, runner: ModelRunner) -> torch.Tensor:
        return runner.kv_cache.kv


PROMPTS = {"a": [5, 17, 3, 8, 22], "b": [9, 1, 40, 41, 42, 43, 7, 7, 2], "c": [60, 61, 62]}


def test_buckets_take_the_smallest_fitting_shape():
    assert BUCKETS.bucket(3, 6, 5) == (4, 8)
    assert BUCKETS.bucket(1, 1, 1) == (1, 1)
    assert BUCKETS.bucket(8, 16, 8) == (8, 16)
    assert BUCKETS.bucket(9, 9, 1) is None  # too many sequences
    assert BUCKETS.bucket(2, 17, 1) is None  # too many tokens
    assert BUCKETS.bucket(2, 4, 9) is None  # a context past the table width


def test_tree_budgets_shrink_as_the_batch_grows_to_stay_in_the_largest_bucket():
    # largest bucket: 16 tokens
    assert BUCKETS.fit_trees(0, [9]) == [9]  # one tree of 9 fits
    assert BUCKETS.fit_trees(0, [9, 9]) == [8, 8]
    assert BUCKETS.fit_trees(0, [9, 3, 9]) == [5, 3, 5]  # a small tree keeps its size (no re-share)
    assert BUCKETS.fit_trees(6, [9, 9]) == [5, 5]  # a prefill chunk's tokens come first
    assert BUCKETS.fit_trees(0, [9] * 16) == [1] * 16  # one token each: roots only, no drafts
    # a step that cannot fit (roots alone pass the bucket) runs eagerly: budgets kept
    assert BUCKETS.fit_trees(0, [9] * 17) == [9] * 17
    assert BUCKETS.fit_trees(16, [4]) == [4]
    assert BUCKETS.fit_trees(15, [4]) == [1]
    assert BUCKETS.fit_trees(3, []) == []


def test_every_usable_bucket_largest_first():
    assert GraphBuckets(seq_sizes=(1, 2, 4), token_sizes=(1, 2, 4, 8), max_num_blocks=8).all_buckets() == [
        (4, 8), (2, 8), (1, 8), (4, 4), (2, 4), (1, 4), (2, 2), (1, 2), (1, 1)]
    # 3 sequences of one token each: bucket (4, 3) is possible, so is (4, 3)'s T = 3 below S = 4
    assert GraphBuckets(seq_sizes=(1, 2, 4), token_sizes=(1, 2, 3, 8), max_num_blocks=8).all_buckets() == [
        (4, 8), (2, 8), (1, 8), (4, 3), (2, 3), (1, 3), (2, 2), (1, 2), (1, 1)]
    assert len(BUCKETS.all_buckets()) == 5 + 4 + 3 + 2  # T >= S here: S = 1, 2, 4, 8
    # every bucket a step can take is among them
    steps = [(n, t) for n in range(1, 9) for t in range(n, 17)]
    assert {BUCKETS.bucket(n, t, 1) for n, t in steps} == set(BUCKETS.all_buckets())


def test_a_padding_only_step_writes_the_dummy_block_alone(model):
    """What ``capture_all`` captures from: a step of padding only, at every bucket, leaves every
    pool block (the real sequences' K/V) as it was."""
    pair = Pair(model, PROMPTS)
    before = pair.kv(pair.padded).clone()
    graphs = pair.padded.graphs
    for bucket in BUCKETS.all_buckets():
        graphs.stage_padding(bucket)
        with torch.inference_mode():
            logits, _ = graphs._padded_forward(bucket)()
        assert logits.shape == (bucket[1], ARCH.vocab_size)
    after = pair.kv(pair.padded)
    assert torch.equal(after[:, :, :NUM_BLOCKS], before[:, :, :NUM_BLOCKS])
    assert not torch.equal(after[:, :, DUMMY], before[:, :, DUMMY])
    assert pair.padded.capture_graphs() == 0  # capture is a no-op off CUDA


def test_pack_step_pads_to_the_bucket_with_the_dummy_block():
    layout = StaticLayout(max_num_tokens=8, max_num_rows=5, max_num_blocks=3)
    buffer = np.full(layout.size, -7, dtype=np.int32)  # stale values from an earlier step
    views = layout.views(buffer, 2, 8)  # bucket (2 sequences, 8 tokens)
    items = [TreeBatchItem("a", 5, TokenTree((11, 12, 13), (-1, 0, 0))), TreeBatchItem("b", 2, TokenTree.chain([21, 22]))]
    cu = pack_step(views, items, [[4, 6], [3]], BLOCK_SIZE, dummy_block=9, logit_rows=[2, 3, 4])
    assert cu == [0, 3, 5]
    assert views["input_ids"].tolist() == [11, 12, 13, 21, 22, 0, 0, 0]
    assert views["positions"].tolist() == [5, 6, 6, 2, 3, 0, 0, 0]
    assert views["tree_parents"].tolist() == [-1, 0, 0, -1, 0, -1, 0, 1]
    # a: positions 5, 6, 7 in block 6; b: positions 2, 3 in block 3; padding: dummy slots 36, 37, 38
    assert views["slot_mapping"].tolist() == [25, 26, 27, 14, 15, 36, 37, 38]
    assert views["logit_indices"].tolist() == [2, 3, 4, 0, 0, 0, 0, 0]
    assert views["prefix_lens"].tolist() == [5, 2, 0]
    assert views["tree_lens"].tolist() == [3, 2, 3]
    assert views["block_tables"].tolist() == [[4, 6, -7], [3, -7, -7], [9, 9, 9]]


@pytest.mark.parametrize("trees", [
    {"a": TokenTree((4, 5, 6), (-1, 0, 0)), "b": TokenTree.chain([8, 9]), "c": TokenTree((1, 2), (-1, 0))},
    {"a": TokenTree((4, 5, 6, 7), (-1, 0, 1, 0)), "b": TokenTree.chain([8, 9, 10, 11, 12])},
    {"b": TokenTree.chain([33])},
], ids=["3seqs-to-4x8", "2seqs-to-2x16", "decode1-to-1x1"])
def test_padded_step_equals_the_unpadded_step(model, trees):
    pair = Pair(model, PROMPTS)
    before = pair.kv(pair.padded).clone()
    eager, padded, items = pair.step(trees)
    bucket = pair.padded.graphs.bucket_for(items)
    assert torch.equal(padded, eager)
    # every real block (indeed every pooled block) holds the same K/V in both caches
    assert torch.equal(pair.kv(pair.padded)[:, :, :NUM_BLOCKS], pair.kv(pair.eager)[:, :, :NUM_BLOCKS])
    # the padding tokens wrote only the dummy block: slots 0 .. num_pad - 1 (mod the block size)
    num_pad = bucket[1] - sum(t.num_nodes for t in trees.values())
    written = pair.kv(pair.padded)[:, :, DUMMY] != before[:, :, DUMMY]  # [layers, 2, block_size, heads, dim]
    assert written.flatten(3).any(-1).any(0).any(0).tolist() == [i < num_pad for i in range(BLOCK_SIZE)]
    assert not pair.kv(pair.eager)[:, :, DUMMY].any()


def test_decode_steps_reuse_a_bucket_with_fresh_inputs(model):
    """Five sequences decode greedily for six steps in bucket (8, 8): the static buffers are
    refilled each step (stale table entries and all) and stay exact."""
    prompts = {str(i): [3 + i, 50 - i, 7 * i % 90 + 1] for i in range(5)}
    pair = Pair(model, prompts)
    next_ids = {seq_id: prompt[-1] for seq_id, prompt in prompts.items()}
    for _ in range(6):
        eager, padded, items = pair.step({s: TokenTree.chain([t]) for s, t in next_ids.items()})
        assert pair.padded.graphs.bucket_for(items) == (8, 8) and pair.padded.num_eager_runs == 0
        assert torch.equal(padded, eager)
        for seq_id, token in zip(next_ids, eager.argmax(-1).tolist()):
            pair.lengths[seq_id] += 1
            next_ids[seq_id] = token
    assert torch.equal(pair.kv(pair.padded)[:, :, :NUM_BLOCKS], pair.kv(pair.eager)[:, :, :NUM_BLOCKS])


def test_fewer_than_four_rows_agree_to_rounding(model):
    pair = Pair(model, PROMPTS)
    eager, padded, _ = pair.step({"a": TokenTree.chain([4]), "b": TokenTree.chain([8]), "c": TokenTree.chain([1])})
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    assert padded.argmax(-1).tolist() == eager.argmax(-1).tolist()


def test_steps_past_the_buckets_run_eagerly(model):
    pair = Pair(model, {"a": [1, 2, 3]})
    long_tree = TokenTree.chain(list(range(10, 27)))  # 17 tokens > the largest bucket's 16
    eager, padded, items = pair.step({"a": long_tree})
    assert pair.padded.graphs.bucket_for(items) is None
    assert torch.equal(padded, eager)
    assert not pair.kv(pair.padded)[:, :, DUMMY].any()
    assert (pair.padded.num_eager_runs, pair.eager.num_eager_runs) == (1, 0)  # counted with graphs on only


def test_a_model_drafter_proposes_the_same_trees_padded(model):
    spec = SpeculativeConfig(method="early_exit", num_layers=2, tree="dynamic", top_k=3, max_tree_tokens=6, max_depth=3)
    drafters = [ModelDrafter(model, 2, spec, NUM_BLOCKS, BLOCK_SIZE, graph_buckets=b) for b in (None, BUCKETS)]
    tokens = {"x": [4, 8, 15, 16, 23, 42], "y": [7, 7, 7, 1]}
    for step in range(3):
        requests = [DraftRequest(seq_id, ids, 6, 3) for seq_id, ids in tokens.items()]
        trees = [drafter.propose(requests) for drafter in drafters]
        assert trees[0] == trees[1]
        for seq_id, tree in zip(tokens, trees[0]):
            tokens[seq_id] = tokens[seq_id] + list(tree.token_ids[1:2]) + [30 + step]
    assert drafters[1].runner.graphs.num_captured == 0  # capture is a no-op off CUDA


def test_kernel_real_rows_ignore_padding_under_one_launch_config():
    """The Triton kernel (interpreted) on a step and on its padded form, with the same tiles and
    split count: the real rows agree exactly, whatever the padding sequences hold."""
    torch.manual_seed(1)
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    k_cache = torch.randn(12, BLOCK_SIZE, num_kv_heads, head_dim)
    v_cache = torch.randn(12, BLOCK_SIZE, num_kv_heads, head_dim)
    items = [TreeBatchItem("a", 9, TokenTree((1, 2, 3, 4), (-1, 0, 0, 1))), TreeBatchItem("b", 6, TokenTree.chain([5, 6]))]
    tables = [[3, 0, 7, 10], [5, 2]]
    q = torch.randn(16, num_heads, head_dim)  # rows 0 .. 5 real, the rest padding
    unpadded = (torch.tensor([[3, 0, 7, 10], [5, 2, 0, 0]], dtype=torch.int32), torch.tensor([9, 6], dtype=torch.int32),
                torch.tensor([4, 2], dtype=torch.int32), torch.tensor([-1, 0, 0, 1, -1, 0], dtype=torch.int32))
    layout = StaticLayout(max_num_tokens=16, max_num_rows=5, max_num_blocks=4)
    views = layout.views(np.zeros(layout.size, dtype=np.int32), 4, 16)  # bucket (4, 16): 10 padding tokens
    pack_step(views, items, tables, BLOCK_SIZE, 11, [])
    padded = [torch.from_numpy(views[k]) for k in ("block_tables", "prefix_lens", "tree_lens", "tree_parents")]
    for num_splits in (1, 2):
        config = LaunchConfig(16, 8, 16, 16, num_splits, 4, 1)
        expected = launch_tree_attention(q[:6], k_cache, v_cache, *unpadded, 0.25, config)
        out = launch_tree_attention(q, k_cache, v_cache, *padded, 0.25, config)
        assert torch.equal(out[:6], expected)


def test_enforce_eager_flag_and_where_graphs_apply(model):
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args([])).model.enforce_eager is ModelConfig.enforce_eager is False
    assert engine_config_from_args(parser.parse_args(["--enforce-eager"])).model.enforce_eager is True
    assert engine_config_from_args(parser.parse_args(["--no-enforce-eager"])).model.enforce_eager is False
    loaded = LoadedModel(model, None, ARCH, "tiny", torch.device("cpu"), torch.float32, 256, ())
    assert graph_buckets_for(EngineConfig(model=ModelConfig(enforce_eager=False)), loaded) is None  # CPU: eager
