"""Runs the target model over one step's token trees: builds the inputs, calls forward, returns logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specserve.cache.kv_cache import KVCache
from specserve.cache.kv_cache_manager import KVCacheManager
from specserve.engine.cuda_graphs import GraphBuckets, GraphRunner
from specserve.models.attention import AttentionMetadata
from specserve.models.llama import LlamaForCausalLM
from specserve.tree import TokenTree
from specserve_kernels.cpu_tree_attention import build_dense_plan


@dataclass(frozen=True)
class TreeBatchItem:
    seq_id: str
    prefix_len: int  # tokens already cached for this sequence
    tree: TokenTree


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    cu_tree_lens: list[int]  # [num_seqs + 1] row offsets of each sequence's tree


def build_inputs(
    items: list[TreeBatchItem], kv_manager: KVCacheManager, device: torch.device, dense_plan: bool = False
) -> ModelInputs:
    """Concatenate the trees; node i of a sequence writes its K/V at position prefix_len + i."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    parents: list[int] = []
    cu = [0]
    tables = [kv_manager.block_table(item.seq_id) for item in items]
    for item in items:
        input_ids += item.tree.token_ids
        positions += item.tree.positions(item.prefix_len)
        parents += item.tree.parents
        slots += [kv_manager.slot(item.seq_id, item.prefix_len + i) for i in range(item.tree.num_nodes)]
        cu.append(len(input_ids))
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    meta = AttentionMetadata(
        slot_mapping=tensor(slots, torch.int64),
        block_tables=tensor(padded, torch.int32),
        prefix_lens=tensor([item.prefix_len for item in items], torch.int32),
        tree_lens=tensor([item.tree.num_nodes for item in items], torch.int32),
        tree_parents=tensor(parents, torch.int32),
        dense_plan=build_dense_plan(
            tables, [item.prefix_len for item in items], [list(item.tree.parents) for item in items],
            kv_manager.block_size, device,
        ) if dense_plan else None,
    )
    return ModelInputs(tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta, cu)


class ModelRunner:
    """Runs ``model`` (its first ``num_layers`` layers if given: an early-exit drafter) over a
    cache with that many layers.

    With ``graph_buckets``, a step that fits a bucket runs padded from static buffers, as a CUDA
    graph on CUDA unless ``capture`` is False (``cuda_graphs.GraphRunner``); the KV cache then
    needs one block more than ``kv_manager``'s pool (the padding rows' dummy block). Other steps
    run eagerly.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: KVCache,
        kv_manager: KVCacheManager,
        num_layers: int | None = None,
        graph_buckets: GraphBuckets | None = None,
        capture: bool = True,
        feature_size: int | None = None,
    ) -> None:
        """``feature_size``: the model reads a float state per token besides its id (a feature
        draft, called as ``model(..., features=)``); ``run`` then takes ``features``."""
        self.model = model
        self.feature_size = feature_size
        self.kv_cache = kv_cache
        self.kv_manager = kv_manager
        self.num_layers = num_layers
        self.device = kv_cache.kv.device
        self.num_eager_runs = 0  # forwards that fit no bucket and ran eagerly (with graph_buckets only)
        self.graphs = None if graph_buckets is None else GraphRunner(
            self.logits, model.attention, graph_buckets, kv_manager, kv_cache.kv.shape[2], self.device, capture,
            feature_size, kv_cache.kv.dtype, self._replay_hooks(),
        )

    def _replay_hooks(self) -> tuple[Callable[[], None], Callable[[], None]] | None:
        """(before, after) a graph replay when this runner's forward streams layers in (an
        offloaded model's: its cross-pass prefetch); None otherwise, e.g. an early-exit drafter
        over resident layers only, which must neither wait for nor redo the prefetch."""
        num_layers = self.num_layers or self.model.cfg.num_layers
        if not self.model.streamed_layers(num_layers):
            return None
        return self.model.before_graph_replay, lambda: self.model.after_graph_replay(num_layers)

    @torch.inference_mode()
    def capture_graphs(self, max_num_seqs: int | None = None) -> int:
        """Capture the CUDA graph of every bucket (of at most ``max_num_seqs`` sequences if
        given) now (``GraphRunner.capture_all``), so no step stalls on a first capture; the
        number captured (0 without graphs or off CUDA)."""
        return 0 if self.graphs is None else self.graphs.capture_all(max_num_seqs)

    def logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, logit_indices: torch.Tensor,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward: logits [len(logit_indices), vocab] float32 of the given rows, and the
        final-norm hidden states [num_tokens, hidden_size] of every row."""
        if self.feature_size is None:
            hidden = self.model(input_ids, positions, self.kv_cache.kv, meta, self.num_layers)
        else:
            hidden = self.model(input_ids, positions, self.kv_cache.kv, meta, self.num_layers, features=features)
        return self.model.compute_logits(hidden.index_select(0, logit_indices)), hidden

    @torch.inference_mode()
    def run(
        self, items: list[TreeBatchItem], logit_rows: list[int], return_hidden: bool = False,
        features: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward every tree: logits [len(logit_rows), vocab] float32 of the given rows, and with
        ``return_hidden`` the final-norm hidden states [num_tokens, hidden_size] of every tree
        row (trees in order; None otherwise). ``features`` [num_tokens, feature_size]: what each
        row reads, for a runner built with ``feature_size`` (and only then). ``input_ids``
        [num_tokens], on the device: the tokens to run instead of the trees' own (which are then
        placeholders), so a step can take tokens an earlier step chose without reading them back."""
        if (features is None) != (self.feature_size is None):
            raise ValueError("features go with a runner built with feature_size, and only with it")
        if input_ids is not None and len(input_ids) != sum(item.tree.num_nodes for item in items):
            raise ValueError(f"input_ids has {len(input_ids)} tokens for a step of "
                             f"{sum(item.tree.num_nodes for item in items)}")
        if self.graphs is not None:
            if self.graphs.bucket_for(items) is not None:
                return self.graphs.run(items, logit_rows, return_hidden, features, input_ids)
            self.num_eager_runs += 1
        inputs = build_inputs(items, self.kv_manager, self.device, self.model.attention.needs_dense_plan)
        rows = torch.tensor(logit_rows, dtype=torch.int64).to(self.device, non_blocking=True)
        ids = inputs.input_ids if input_ids is None else input_ids.to(self.device, torch.int64)
        logits, hidden = self.logits(ids, inputs.positions, inputs.meta, rows, features)
        return logits, hidden if return_hidden else None


@torch.inference_mode()
def prompt_logits(model: LlamaForCausalLM, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits at every position of one prompt [len, vocab] through a private paged cache
    (blocks deliberately out of order, so paging is exercised). For tests and distillation."""
    cfg = model.cfg
    device = model.embed_tokens.weight.device
    num_blocks = -(-len(token_ids) // block_size)
    manager = KVCacheManager(num_blocks + 1, block_size, enable_prefix_caching=False)
    manager.pool.allocate()  # block 0 stays unused: tables then never start at 0
    cache = KVCache(cfg.num_layers, num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim,
                    model.embed_tokens.weight.dtype, device)
    manager.add_sequence("prompt", token_ids)
    manager.allocate_slots("prompt", 0, len(token_ids))
    manager.block_tables["prompt"].reverse()
    runner = ModelRunner(model, cache, manager)
    logits, _ = runner.run([TreeBatchItem("prompt", 0, TokenTree.chain(token_ids))], list(range(len(token_ids))))
    return logits
