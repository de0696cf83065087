"""CUDA graphs of decode and verify forwards, at bucketed shapes, replayed from static buffers.

A graph replays the kernels of one fixed shape, so a step is padded up to a bucket
(S sequences, T tokens) before it runs::

    sequence rows  [ real 0 .. n-1 | empty n .. S-1 (tree_len 0) | padding sequence S ]
    token rows     [ the real trees, concatenated (t rows)       | padding chain (T - t rows) ]

The padding sequence (row S, prefix 0) owns the T - t padding tokens as one chain; its block
table row is all the dummy block, so padding tokens write their K/V there and attend only to
each other. The dummy block is the KV cache's last block, which the block pool never hands out.

Invariants:
- a real sequence's rows see exactly what they see unpadded: its own block-table row, prefix
  and tree (attention never mixes sequences); padding writes nothing outside the dummy block;
- every launch parameter (grid, split count, tiles) follows from (S, T) and the table width
  ``max_num_blocks`` (the kernel's max-context bound), never from the live lengths;
- nothing on the replay path synchronises with the device: the inputs travel in one pinned
  int32 buffer with one asynchronous copy (the event wait only covers the previous copy).

Static inputs: one int32 buffer on the device and its host twin, in regions sized for the
largest bucket (T_max tokens, R = S_max + 1 sequence rows, W table width)::

    input_ids | positions | slot_mapping | tree_parents | logit_indices | prefix_lens | tree_lens | block_tables
    T_max       T_max       T_max          T_max          T_max           R             R           R * W

Capture: ``capture_all`` (the engine calls it at start-up) captures every bucket a step can
use, largest first, from an all-padding step (only the dummy block is written): a bucket met
for the first time mid-serving would otherwise stall that step by an eager forward plus a
capture (about 25 ms on the H200, 15x a replayed step). A bucket not yet captured when a step
needs it is captured then: the step runs its forward eagerly once (the K/V it writes are the
ones the replay writes again), captures it, then replays it. The graphs of one runner share one memory pool and write their
logits into one static buffer, copied out right after each replay.
Off CUDA (or with ``capture=False``) the same padded forward runs eagerly, which is how the
padding is tested on the CPU.

A runner built with ``feature_size`` (a feature-level draft, which reads a float state per
token besides its id) also keeps a static float buffer [T_max, feature_size]: a step's
features are copied into its first rows on the device; padding rows read whatever the buffer
holds, which only their own (dummy-block) rows see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from specserve.models.attention import AttentionBackend, AttentionMetadata

if TYPE_CHECKING:
    from specserve.cache.kv_cache_manager import KVCacheManager
    from specserve.config import EngineConfig
    from specserve.engine.model_runner import TreeBatchItem
    from specserve.models.loader import LoadedModel

SEQ_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
TOKEN_FIELDS = ("input_ids", "positions", "slot_mapping", "tree_parents", "logit_indices")
ROW_FIELDS = ("prefix_lens", "tree_lens")

# forward(input_ids [T] int64, positions [T] int64, meta, logit_indices [T] int64,
#         features [T, feature_size] or None) -> (logits [T, vocab], hidden [T, hidden_size])
Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class GraphBuckets:
    """The shapes that run padded (and, on CUDA, as graphs): S from ``seq_sizes``, T from
    ``token_sizes``; every block table is ``max_num_blocks`` wide."""

    seq_sizes: tuple[int, ...]  # increasing
    token_sizes: tuple[int, ...]  # increasing
    max_num_blocks: int  # table width; max_num_blocks * block_size bounds every context

    def __post_init__(self) -> None:
        for name, sizes in (("seq_sizes", self.seq_sizes), ("token_sizes", self.token_sizes)):
            if not sizes or sizes[0] < 1 or list(sizes) != sorted(set(sizes)):
                raise ValueError(f"{name} must be increasing positive integers, not {sizes}")
        if self.max_num_blocks < 1:
            raise ValueError(f"max_num_blocks must be positive, not {self.max_num_blocks}")

    def bucket(self, num_seqs: int, num_tokens: int, num_blocks: int) -> tuple[int, int] | None:
        """The smallest (S, T) with S >= num_seqs and T >= num_tokens; None (run eagerly) when
        there is none or a sequence reads more than ``max_num_blocks`` blocks."""
        if num_seqs < 1 or num_blocks > self.max_num_blocks:
            return None
        seqs = next((s for s in self.seq_sizes if s >= num_seqs), None)
        tokens = next((t for t in self.token_sizes if t >= num_tokens), None)
        return None if seqs is None or tokens is None else (seqs, tokens)

    def all_buckets(self) -> list[tuple[int, int]]:
        """Every (S, T) a step can use, largest T first: S's fewest sequences (one past the
        next smaller seq size) bring a token each, so T must hold that many; T may be below S
        (17 sequences of one token each: bucket (32, 24))."""
        fewest = dict(zip(self.seq_sizes, (1,) + tuple(s + 1 for s in self.seq_sizes[:-1])))
        return [(s, t) for t in reversed(self.token_sizes) for s in reversed(self.seq_sizes) if t >= fewest[s]]

    def fit_trees(self, num_prefill_tokens: int, tree_slots: list[int]) -> list[int]:
        """Decode trees' token budgets (root included) capped at an equal share of what the
        largest token bucket leaves after the prefill tokens: a batch of trees past the largest
        bucket would run eagerly, about 10x a graph step's cost on a GPU, so the tree budget
        shrinks as the batch grows. A step that cannot fit even with roots only (a long prefill
        chunk rides in it) runs eagerly anyway and keeps its budgets."""
        if num_prefill_tokens + len(tree_slots) > self.token_sizes[-1]:
            return list(tree_slots)
        share = (self.token_sizes[-1] - num_prefill_tokens) // len(tree_slots) if tree_slots else 0
        return [min(slots, share) for slots in tree_slots]


def graph_buckets_for(config: EngineConfig, loaded: LoadedModel) -> GraphBuckets | None:
    """The engine's buckets, or None (every forward eager) with --enforce-eager, off CUDA or with
    an attention backend other than Triton. Offloaded models are captured too: their layer
    copies become graph nodes (``offload.offloaded_model``)."""
    if config.model.enforce_eager or loaded.device.type != "cuda" or loaded.model.attention.name != "triton":
        return None
    max_num_seqs = config.scheduler.max_num_seqs
    seq_sizes = tuple(s for s in SEQ_SIZES if s < max_num_seqs) + (max_num_seqs,)
    max_positions = loaded.max_model_len + config.speculative.max_tree_tokens + 1
    max_num_blocks = -(-max_positions // config.cache.block_size)
    return GraphBuckets(seq_sizes, TOKEN_SIZES, max_num_blocks)


@dataclass(frozen=True)
class StaticLayout:
    """Where each input lives in the int32 buffer (the module docstring draws it)."""

    max_num_tokens: int
    max_num_rows: int  # sequence rows: the largest S plus the padding sequence
    max_num_blocks: int

    def offset(self, name: str) -> int:
        if name in TOKEN_FIELDS:
            return TOKEN_FIELDS.index(name) * self.max_num_tokens
        base = len(TOKEN_FIELDS) * self.max_num_tokens
        if name in ROW_FIELDS:
            return base + ROW_FIELDS.index(name) * self.max_num_rows
        if name != "block_tables":
            raise KeyError(name)
        return base + len(ROW_FIELDS) * self.max_num_rows

    @property
    def size(self) -> int:
        return self.offset("block_tables") + self.max_num_rows * self.max_num_blocks

    def views(self, buffer, num_seqs: int, num_tokens: int) -> dict:
        """Every field cut to bucket (num_seqs, num_tokens), as views of ``buffer`` (a tensor or
        an ndarray): token fields [T], row fields [S + 1], block_tables [S + 1, max_num_blocks]."""
        rows = num_seqs + 1
        views = {name: buffer[self.offset(name) : self.offset(name) + num_tokens] for name in TOKEN_FIELDS}
        views.update({name: buffer[self.offset(name) : self.offset(name) + rows] for name in ROW_FIELDS})
        start = self.offset("block_tables")
        views["block_tables"] = buffer[start : start + rows * self.max_num_blocks].reshape(rows, self.max_num_blocks)
        return views


def pack_step(
    views: dict[str, np.ndarray],
    items: list[TreeBatchItem],
    block_tables: list[list[int]],
    block_size: int,
    dummy_block: int,
    logit_rows: list[int],
) -> list[int]:
    """Write one step, padded to the bucket ``views`` were cut to; returns the real cu_tree_lens.

    Real tree node i of a sequence writes its K/V at logical position prefix_len + i, as in
    ``model_runner.build_inputs``. Padding tokens: id 0, position 0, a chain whose slots cycle
    through the dummy block. Table entries past what a sequence reads are left as they were
    (never read); the padding sequence's row is all the dummy block.
    """
    pad_row = len(views["prefix_lens"]) - 1
    row, cu_tree_lens = 0, [0]
    for s, (item, table) in enumerate(zip(items, block_tables)):
        num_nodes, prefix_len = item.tree.num_nodes, item.prefix_len
        end = row + num_nodes
        num_read = -(-(prefix_len + num_nodes) // block_size)
        blocks = np.asarray(table[:num_read], dtype=np.int64)
        where = np.arange(prefix_len, prefix_len + num_nodes)
        views["input_ids"][row:end] = item.tree.token_ids
        views["positions"][row:end] = item.tree.positions(prefix_len)
        views["tree_parents"][row:end] = item.tree.parents
        views["slot_mapping"][row:end] = blocks[where // block_size] * block_size + where % block_size
        views["block_tables"][s, :num_read] = blocks
        views["prefix_lens"][s] = prefix_len
        views["tree_lens"][s] = num_nodes
        row = end
        cu_tree_lens.append(row)
    views["prefix_lens"][len(items) :] = 0
    views["tree_lens"][len(items) : pad_row] = 0
    chain = np.arange(len(views["input_ids"]) - row)
    views["input_ids"][row:] = 0
    views["positions"][row:] = 0
    views["tree_parents"][row:] = chain - 1
    views["slot_mapping"][row:] = dummy_block * block_size + chain % block_size
    views["tree_lens"][pad_row] = len(chain)
    views["block_tables"][pad_row] = dummy_block
    views["logit_indices"][: len(logit_rows)] = logit_rows
    views["logit_indices"][len(logit_rows) :] = 0
    return cu_tree_lens


def forward_views(forward: Forward, views: dict[str, torch.Tensor],
                  features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward`` over one bucket's static views (``StaticLayout.views`` of the device buffer):
    (logits [T, vocab], hidden [T, hidden_size])."""
    meta = AttentionMetadata(
        slot_mapping=views["slot_mapping"].long(),
        block_tables=views["block_tables"],
        prefix_lens=views["prefix_lens"],
        tree_lens=views["tree_lens"],
        tree_parents=views["tree_parents"],
    )
    return forward(views["input_ids"].long(), views["positions"].long(), meta, views["logit_indices"].long(), features)


class GraphRunner:
    """Runs ``forward`` at bucketed shapes from static buffers; on CUDA (``capture``) each
    bucket's forward is a CUDA graph, captured by ``capture_all`` (the engine calls it at
    start-up) or else the first time the bucket is used.

    ``num_cache_blocks``: blocks of the KV tensors; the last one is the dummy block and must lie
    outside ``kv_manager``'s pool.
    """

    def __init__(
        self,
        forward: Forward,
        attention: AttentionBackend,
        buckets: GraphBuckets,
        kv_manager: KVCacheManager,
        num_cache_blocks: int,
        device: torch.device,
        capture: bool = True,
        feature_size: int | None = None,
        feature_dtype: torch.dtype = torch.float32,
        replay_hooks: tuple[Callable[[], None], Callable[[], None]] | None = None,
    ) -> None:
        """``replay_hooks``: (before, after) called around every graph replay (an offloaded model
        waits for and then issues its cross-pass prefetch: ``offload.offloaded_model``)."""
        if attention.needs_dense_plan:
            raise ValueError(f"padded steps need attention without a host-built plan, not {attention.name!r}")
        self.capture = capture and device.type == "cuda"
        if self.capture and attention.name != "triton":
            raise ValueError(f"CUDA graphs need the triton attention backend, not {attention.name!r}")
        if num_cache_blocks <= kv_manager.pool.num_blocks:
            raise ValueError("padded steps need a KV cache with one block more than the pool (the dummy block)")
        if num_cache_blocks * kv_manager.block_size >= 2**31:
            raise ValueError("padded steps keep slots in int32: the KV cache has too many slots")
        self.forward = forward
        self.replay_hooks = replay_hooks
        self.buckets = buckets
        self.kv_manager = kv_manager
        self.dummy_block = num_cache_blocks - 1
        self.device = device
        max_num_tokens = buckets.token_sizes[-1]
        # the padding chain reads positions 0 .. T - 1 through its table row: the width covers them
        width = max(buckets.max_num_blocks, -(-max_num_tokens // kv_manager.block_size))
        self.layout = StaticLayout(max_num_tokens, buckets.seq_sizes[-1] + 1, width)
        self.host = torch.zeros(self.layout.size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.static = torch.zeros(self.layout.size, dtype=torch.int32, device=device)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.logits: torch.Tensor | None = None  # [T_max, vocab] float32, the graphs' shared output
        self.hidden: torch.Tensor | None = None  # [T_max, hidden_size], likewise
        self.forwards: dict[tuple[int, int], Callable[[], tuple[torch.Tensor, torch.Tensor]]] = {}
        self.features = None if feature_size is None else torch.zeros(
            max_num_tokens, feature_size, dtype=feature_dtype, device=device)  # [T_max, feature_size]

    @property
    def num_captured(self) -> int:
        return len(self.forwards) if self.capture else 0

    def capture_all(self, max_num_seqs: int | None = None) -> int:
        """Capture every bucket not yet captured (``GraphBuckets.all_buckets``, largest first, so
        smaller graphs reuse the pool's memory; only those of at most ``max_num_seqs``
        sequences if given) from an all-padding step; the number captured. A no-op without
        ``capture``."""
        if not self.capture:
            return 0
        before = self.num_captured
        for bucket in self.buckets.all_buckets():
            if bucket not in self.forwards and (max_num_seqs is None or bucket[0] <= max_num_seqs):
                self.stage_padding(bucket)
                self.forwards[bucket] = self._capture(bucket)
        return self.num_captured - before

    def stage_padding(self, bucket: tuple[int, int]) -> None:
        """Put a step of padding only (no real sequence) into the static buffers at ``bucket``:
        its forward writes K/V into the dummy block alone."""
        if self.copied is not None:
            self.copied.synchronize()
        views = self.layout.views(self.host.numpy(), *bucket)
        pack_step(views, [], [], self.kv_manager.block_size, self.dummy_block, [])
        self.static.copy_(self.host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def bucket_for(self, items: list[TreeBatchItem]) -> tuple[int, int] | None:
        if not items:
            return None
        block_size = self.kv_manager.block_size
        num_tokens = sum(item.tree.num_nodes for item in items)
        num_blocks = max(-(-(item.prefix_len + item.tree.num_nodes) // block_size) for item in items)
        return self.buckets.bucket(len(items), num_tokens, num_blocks)

    def run(
        self, items: list[TreeBatchItem], logit_rows: list[int], return_hidden: bool = False,
        features: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [len(logit_rows), vocab] float32 and, with ``return_hidden``, the hidden states
        [real tokens, hidden_size] (fresh tensors; else None); ``items`` must fit a bucket
        (``bucket_for``). ``features`` [real tokens, feature_size]: with a feature buffer only,
        and then required. ``input_ids`` [real tokens] on the device: copied over the packed
        token ids on the device, after the host's copy (stream order), with no host sync."""
        bucket = self.bucket_for(items)
        if bucket is None:
            raise ValueError("this step fits no bucket: run it eagerly")
        if (features is None) != (self.features is None):
            raise ValueError("a runner with a feature buffer needs features every step, and only it takes them")
        if features is not None:
            if len(features) != sum(item.tree.num_nodes for item in items):
                raise ValueError(f"features has {len(features)} rows for a step of "
                                 f"{sum(item.tree.num_nodes for item in items)} tokens")
            self.features[: len(features)].copy_(features)
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the host buffer
        tables = [self.kv_manager.block_table(item.seq_id) for item in items]
        views = self.layout.views(self.host.numpy(), *bucket)
        cu_tree_lens = pack_step(views, items, tables, self.kv_manager.block_size, self.dummy_block, logit_rows)
        self.static.copy_(self.host, non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if input_ids is not None:
            self.layout.views(self.static, *bucket)["input_ids"][: cu_tree_lens[-1]].copy_(input_ids)
        forward = self.forwards.get(bucket)
        if forward is None:
            forward = self._capture(bucket) if self.capture else self._padded_forward(bucket)
            self.forwards[bucket] = forward
        logits, hidden = forward()
        return logits[: len(logit_rows)].clone(), hidden[: cu_tree_lens[-1]].clone() if return_hidden else None

    def _padded_forward(self, bucket: tuple[int, int]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """The forward over the static buffers' bucket views: logits [T, vocab], hidden [T, hidden_size]."""
        views = self.layout.views(self.static, *bucket)

        def forward() -> torch.Tensor:
            features = None if self.features is None else self.features[: bucket[1]]
            return forward_views(self.forward, views, features)

        return forward

    def _capture(self, bucket: tuple[int, int]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        """Warm up, capture, and return the replay; every graph writes its logits and hidden
        states into the one static ``self.logits`` [T_max, vocab] and ``self.hidden``
        [T_max, hidden_size], so no graph keeps an output of its own alive."""
        forward = self._padded_forward(bucket)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            warm_logits, warm_hidden = forward()  # compiles, and writes the K/V the replay rewrites
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.logits is None:
            size = self.layout.max_num_tokens
            self.logits = torch.empty(size, warm_logits.shape[1], dtype=warm_logits.dtype, device=self.device)
            self.hidden = torch.empty(size, warm_hidden.shape[1], dtype=warm_hidden.dtype, device=self.device)
        del warm_logits, warm_hidden
        logits, hidden = self.logits[: bucket[1]], self.hidden[: bucket[1]]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out_logits, out_hidden = forward()
            logits.copy_(out_logits)
            hidden.copy_(out_hidden)

        hooks = self.replay_hooks

        def replay() -> tuple[torch.Tensor, torch.Tensor]:
            if hooks is not None:
                hooks[0]()
            graph.replay()
            if hooks is not None:
                hooks[1]()
            return logits, hidden

        return replay
