"""Every level of a chain draft step (``tree="chain"``) in one CUDA graph per bucket (S, L).

After the root's forward, a chain step runs L = depth - 1 levels: level d (1 .. L) runs every
sequence's one-token tree at position root + d, its token the top-1 of level d - 1 (level 0:
the root's), which only the device knows. Here all L levels are packed on the host at once,
copied with one asynchronous copy, and run by one graph whose body feeds each level's top-1
(and, for a feature draft, its predicted state) to the next on the device. Off CUDA (or
without capture) the same body runs eagerly.

Static inputs: the first L regions of one int32 buffer on the device and its pinned host twin,
each region one level's step as ``pack_step`` writes it, laid out by ``StaticLayout(T, S + 1,
W)`` (T: the smallest token size >= S; W: the ``GraphRunner``'s table width)::

    [ level 1 | level 2 | ... | level L ]              each region StaticLayout(T, S + 1, W).size

    token rows     [ real 0 .. n-1 | padding chain n .. T-1 ]   (rows 0 .. S-1 of input_ids
                                                                 are written on the device)
    sequence rows  [ real 0 .. n-1 | empty n .. S-1 (tree_len 0) | padding sequence S ]

Device buffers (sized for the largest bucket, S_max sequences, T_max tokens, L_max levels)::

    first_ids     [S_max] int64                  level 1's tokens (the root's top-1)
    first_states  [S_max, feature_size]          level 1's reads (the root's predicted states)
    features      [T_max, feature_size]          what the running level's rows read
    values        [L_max, S_max, k] float32      (output) each level's top-k probabilities
    ids           [L_max, S_max, k] int64        (output) and their token ids

Invariants:
- real row s of level d sees what the level-by-level chain loop's padded step sees: its table
  row, prefix root + d, a one-token tree, token ids[d - 2, s, 0] (level 1: first_ids[s]) and,
  for a feature draft, the state row s of level d - 1 predicted (level 1: first_states[s]);
  so, at the same bucket, the outputs are that loop's, bit for bit on the CPU;
- rows n .. S - 1 are padding-chain tokens: their ids are some top-k index (always a valid
  token), their K/V go to the dummy block only, and their outputs are never read;
- nothing on the replay path synchronises with the device; the host buffer is rewritten only
  once the previous copy out of it has finished (an event).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from specserve.engine.cuda_graphs import GraphRunner, StaticLayout, forward_views


def pack_chain(levels: np.ndarray, layout: StaticLayout, tables: np.ndarray, root_prefixes: np.ndarray,
               block_size: int, dummy_block: int) -> None:
    """Write every level's step into ``levels`` [L, layout.size] (row d: level d + 1), as
    ``pack_step`` would write level d + 1's one-token trees at prefix root + d + 1 with logit
    rows 0 .. S-1. tables [n, W]: each sequence's block table (entries past what it reads are
    never read); root_prefixes [n]. Block-table rows of empty sequences hold the dummy block."""
    num_levels, num_seqs = len(levels), len(root_prefixes)
    num_tokens, num_rows = layout.max_num_tokens, layout.max_num_rows
    pad_row = num_rows - 1

    def field(name: str, width: int) -> np.ndarray:  # [L, width] view
        return levels[:, layout.offset(name) : layout.offset(name) + width]

    prefix = root_prefixes[None, :] + np.arange(1, num_levels + 1)[:, None]  # [L, n]
    chain = np.arange(num_tokens - num_seqs)  # the padding sequence's tokens
    field("input_ids", num_tokens)[:] = 0  # placeholders: the graph writes the real tokens
    positions = field("positions", num_tokens)
    positions[:, :num_seqs], positions[:, num_seqs:] = prefix, 0
    parents = field("tree_parents", num_tokens)
    parents[:, :num_seqs], parents[:, num_seqs:] = -1, chain - 1
    slots = field("slot_mapping", num_tokens)
    slots[:, :num_seqs] = tables[np.arange(num_seqs), prefix // block_size] * block_size + prefix % block_size
    slots[:, num_seqs:] = dummy_block * block_size + chain % block_size
    logit_indices = field("logit_indices", num_tokens)
    logit_indices[:, :pad_row], logit_indices[:, pad_row:] = np.arange(pad_row), 0
    prefix_lens = field("prefix_lens", num_rows)
    prefix_lens[:, :num_seqs], prefix_lens[:, num_seqs:] = prefix, 0
    tree_lens = field("tree_lens", num_rows)
    tree_lens[:, :num_seqs], tree_lens[:, num_seqs:pad_row], tree_lens[:, pad_row] = 1, 0, len(chain)
    block_tables = field("block_tables", num_rows * layout.max_num_blocks).reshape(num_levels, num_rows, -1)
    block_tables[:, :num_seqs], block_tables[:, num_seqs:] = tables, dummy_block


class ChainGraphRunner:
    """Runs the L levels of a chain step from static buffers, as one CUDA graph per (S, L) on
    CUDA (captured by ``capture_all`` or on first use), else eagerly; ``graphs``: the drafter's
    ``GraphRunner`` (its forward, buckets, KV manager, dummy block, pool and table width).
    ``max_levels``: the most levels a step runs (the drafter's max_depth - 1); ``top_k``: the
    candidates kept per level. Resident layers only: a replay here calls no streaming hooks
    (``GraphRunner.replay_hooks``), so over streamed layers it would read stale buffers."""

    def __init__(self, graphs: GraphRunner, max_levels: int, top_k: int) -> None:
        if graphs.replay_hooks is not None:  # its levels would read buffers the prefetch refills
            raise ValueError("chain graphs run resident layers only, not layers streamed from host memory")
        self.graphs = graphs
        self.top_k = top_k
        self.max_levels = max_levels
        token_sizes = graphs.buckets.token_sizes
        # S -> T, the smallest token size >= S (a level reads its logits from rows 0 .. S-1)
        self.token_size = {s: next(t for t in token_sizes if t >= s) for s in graphs.buckets.seq_sizes
                           if s <= token_sizes[-1]}
        max_seqs = max(self.token_size, default=0)
        size = max((self.layout_for(s).size for s in self.token_size), default=0) * max_levels
        device = graphs.device
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")
        self.static = torch.zeros(size, dtype=torch.int32, device=device)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.first_ids = torch.zeros(max_seqs, dtype=torch.int64, device=device)  # [S_max]
        outputs = (max_levels, max_seqs, top_k)
        self.values = torch.zeros(outputs, dtype=torch.float32, device=device)  # [L_max, S_max, k] (output)
        self.ids = torch.zeros(outputs, dtype=torch.int64, device=device)  # [L_max, S_max, k] (output)
        features = graphs.features  # [T_max of the GraphRunner, feature_size] or None
        self.first_states = None if features is None else features.new_zeros(max_seqs, features.shape[1])
        self.features = None if features is None else features.new_zeros(
            self.token_size.get(max_seqs, 0), features.shape[1])  # [T_max, feature_size]
        self.forwards: dict[tuple[int, int], Callable[[], None]] = {}
        self.num_runs = 0

    def layout_for(self, num_seqs: int) -> StaticLayout:
        return StaticLayout(self.token_size[num_seqs], num_seqs + 1, self.graphs.layout.max_num_blocks)

    @property
    def num_captured(self) -> int:
        return len(self.forwards) if self.graphs.capture else 0

    def bucket_for(self, root_prefixes: list[int], num_levels: int) -> int | None:
        """S for these sequences, or None (run level by level) when none fits: too many
        sequences, too many levels, or a context past the table width at the deepest level."""
        if not root_prefixes or not 1 <= num_levels <= self.max_levels:
            return None
        deepest = max(root_prefixes) + num_levels  # the deepest level's position
        if -(-(deepest + 1) // self.graphs.kv_manager.block_size) > self.graphs.buckets.max_num_blocks:
            return None
        return next((s for s in self.token_size if s >= len(root_prefixes)), None)

    @torch.inference_mode()
    def capture_all(self, num_levels: int) -> int:
        """Capture (S, num_levels) for every S, largest first, from all-padding steps (only the
        dummy block is written); the number captured. A no-op without capture."""
        if not self.graphs.capture or not 1 <= num_levels <= self.max_levels:
            return 0
        before = self.num_captured
        for num_seqs in sorted(self.token_size, reverse=True):
            if (num_seqs, num_levels) not in self.forwards:
                self._stage([], [], num_seqs, num_levels)
                self.forwards[num_seqs, num_levels] = self._capture(self._body(num_seqs, num_levels))
        return self.num_captured - before

    @torch.inference_mode()
    def run(self, seq_ids: list[str], root_prefixes: list[int], num_levels: int, first_ids: torch.Tensor,
            first_states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Levels 1 .. num_levels of the chains rooted at ``root_prefixes`` (every sequence as
        deep): (values [num_levels, n, k] float32, ids [num_levels, n, k]), views of the static
        outputs valid until the next run; None when no bucket fits (``bucket_for``).
        first_ids [n] (on the device): level 1's tokens; first_states [n, feature_size]: level
        1's reads, with a feature draft (and only then)."""
        if (first_states is None) != (self.features is None):
            raise ValueError("first_states go with a feature draft's runner, and only with it")
        num_seqs = self.bucket_for(root_prefixes, num_levels)
        if num_seqs is None:
            return None
        n = len(seq_ids)
        self.first_ids[:n].copy_(first_ids)
        if first_states is not None:
            self.first_states[:n].copy_(first_states)
        self._stage(seq_ids, root_prefixes, num_seqs, num_levels)
        forward = self.forwards.get((num_seqs, num_levels))
        if forward is None:
            forward = self._body(num_seqs, num_levels)
            forward = self._capture(forward) if self.graphs.capture else forward
            self.forwards[num_seqs, num_levels] = forward
        forward()
        self.num_runs += 1
        return self.values[:num_levels, :n], self.ids[:num_levels, :n]

    def _stage(self, seq_ids: list[str], root_prefixes: list[int], num_seqs: int, num_levels: int) -> None:
        """Pack every level on the host and copy them to the device in one asynchronous copy."""
        layout, manager = self.layout_for(num_seqs), self.graphs.kv_manager
        width, dummy = layout.max_num_blocks, self.graphs.dummy_block
        tables = np.full((len(seq_ids), width), dummy, dtype=np.int64)  # [n, W]
        for row, seq_id in zip(tables, seq_ids):
            table = manager.block_table(seq_id)[:width]
            row[: len(table)] = table
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy has left the host buffer
        size = num_levels * layout.size
        levels = self.host.numpy()[:size].reshape(num_levels, layout.size)
        pack_chain(levels, layout, tables, np.asarray(root_prefixes, dtype=np.int64), manager.block_size, dummy)
        self.static[:size].copy_(self.host[:size], non_blocking=True)
        if self.copied is not None:
            self.copied.record()

    def _body(self, num_seqs: int, num_levels: int) -> Callable[[], None]:
        """The levels back to back over the static buffers' bucket views (see the module docstring)."""
        layout = self.layout_for(num_seqs)
        num_tokens = layout.max_num_tokens
        views = [layout.views(self.static[d * layout.size : (d + 1) * layout.size], num_seqs, num_tokens)
                 for d in range(num_levels)]
        features = None if self.features is None else self.features[:num_tokens]  # [T, feature_size]

        def body() -> None:
            tokens = self.first_ids[:num_seqs]  # [S]
            states = None if self.first_states is None else self.first_states[:num_seqs]  # [S, feature_size]
            for level, view in enumerate(views):
                view["input_ids"][:num_seqs].copy_(tokens)
                if features is not None:
                    features[:num_seqs].copy_(states)
                logits, hidden = forward_views(self.graphs.forward, view, features)
                values, ids = torch.topk(torch.softmax(logits[:num_seqs].float(), dim=-1), self.top_k, dim=-1)
                self.values[level, :num_seqs].copy_(values)
                self.ids[level, :num_seqs].copy_(ids)
                tokens, states = ids[:, 0], hidden[:num_seqs]

        return body

    def _capture(self, body: Callable[[], None]) -> Callable[[], None]:
        """Warm up on a side stream (compiles; writes the K/V the replay rewrites), capture into
        the ``GraphRunner``'s pool (every output lives in static buffers, so graphs may share
        it), and return the replay."""
        device = self.graphs.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graphs.pool, capture_error_mode="thread_local"):
            body()
        return graph.replay
