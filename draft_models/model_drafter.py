"""A drafter driven by a model: the target's first layers (early exit) or a small trained draft.

The drafter keeps its own paged KV cache (``num_layers`` layers, its own block pool) holding the
committed tokens of every sequence it drafts for. One ``propose`` call, for every sequence:

1. catch up: run the tokens committed since the last call, ending with the tree's root (the
   target's pending token), as a chain; the root's logits give the first candidates;
2. grow the tree level by level with a tree builder: each level runs the paths from the root
   to the frontier nodes (a small tree, recomputed whole, so no level depends on slots written
   by another) and reads the frontier's logits.

   With ``tree="chain"`` (``ChainTreeBuilder``) the frontier is one node per sequence, the
   draft's top-1 so far, so levels need no host decision: level d runs the chain's depth-d
   token (taken on the device from level d-1's top candidates) at position root + d, its K/V
   written past the root like a tree node's, and the candidates of every level are read back
   once, after the last (``_propose_chain``). The result equals the level-by-level loop's.
   With graph buckets and every sequence drafting as deep, all levels run as one CUDA graph
   (``chain_graphs``; padded and eager off CUDA).

Invariant: after ``propose``, the drafter's cache holds exactly the sequence's tokens up to and
including the root at positions 0 .. root; draft nodes' slots lie past it and are released at
the next call (rollback to the accepted path is a trim: accepted tokens are recomputed as part
of the next catch-up chain, together with the next root).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from draft_models.base import DraftRequest
from specserve.cache.kv_cache import KVCache
from specserve.cache.kv_cache_manager import KVCacheManager
from specserve.config import SpeculativeConfig
from specserve.engine.chain_graphs import ChainGraphRunner
from specserve.engine.cuda_graphs import GraphBuckets
from specserve.engine.model_runner import ModelRunner, TreeBatchItem
from specserve.models.llama import LlamaForCausalLM
from specserve.tree import TokenTree
from specserve.tree.builders import (
    Candidates,
    ChainTreeBuilder,
    DynamicTreeBuilder,
    StaticTreeBuilder,
)


def top_candidates(logits: torch.Tensor, k: int) -> list[Candidates]:
    """logits [rows, vocab] -> per row the k most likely (token, probability), best first."""
    values, indices = top_on_device(logits, k)
    return [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


def top_on_device(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [rows, vocab] -> (probabilities [rows, k] float32, token ids [rows, k]), best first."""
    return torch.topk(torch.softmax(logits.float(), dim=-1), k, dim=-1)


class ModelDrafter:
    needs_target_states = False

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_layers: int,
        config: SpeculativeConfig,
        num_blocks: int,
        block_size: int,
        select_counts: Callable[[list[list[float]], float], list[int]] | None = None,
        graph_buckets: GraphBuckets | None = None,
        feature_size: int | None = None,
    ) -> None:
        """``select_counts(ranked path probabilities per sequence, drafting seconds so far)``
        picks how many of each tree's most probable nodes to keep (the Sequoia-like budget);
        without it every tree keeps up to its request's max_tree_tokens nodes.
        ``graph_buckets``: steps that fit one run padded (CUDA graphs on CUDA); our cache then
        has one block past the pool, the padding rows' dummy block. ``feature_size``: the model
        reads a state per token (a feature draft; ``ModelRunner``)."""
        if not 1 <= num_layers <= model.cfg.num_layers:
            raise ValueError(f"a drafter needs 1..{model.cfg.num_layers} layers, not {num_layers}")
        device = model.embed_tokens.weight.device
        self.config = config
        self.kv_manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self.kv_cache = KVCache(
            num_layers, num_blocks + (graph_buckets is not None), block_size, model.cfg.num_kv_heads,
            model.cfg.head_dim, model.embed_tokens.weight.dtype, device,
        )
        self.runner = ModelRunner(model, self.kv_cache, self.kv_manager, num_layers, graph_buckets,
                                  feature_size=feature_size)
        # over layers streamed from host memory (an early-exit drafter on an offloaded target):
        # no start-up capture (each copies the streamed weights twice; first use captures) and
        # no chain graphs (their replay would skip the streamer's prefetch)
        resident = not model.streamed_layers(num_layers)
        chained = resident and self.runner.graphs is not None and config.tree == "chain" and config.max_depth >= 2
        self.chain_graphs = ChainGraphRunner(self.runner.graphs, config.max_depth - 1, config.top_k) if chained else None
        model.attention.warm_up(  # a draft of other head shapes than the target's has its own variants
            model.cfg, block_size, num_blocks * block_size, model.embed_tokens.weight.dtype, device
        )
        if resident:  # no first-capture stalls mid-serving (none off CUDA)
            self.runner.capture_graphs()
            if self.chain_graphs is not None:
                self.chain_graphs.capture_all(config.max_depth - 1)
        self.num_cached: dict[str, int] = {}  # tokens of each sequence with K/V in our cache
        self.select_counts = select_counts

    @property
    def num_candidates(self) -> int:
        cfg = self.config
        return cfg.top_k if cfg.tree in ("dynamic", "chain") else max(cfg.widths)

    def max_nodes_created(self, max_tree_tokens: int, max_depth: int) -> int:
        """Upper bound on the nodes one level's subtree can hold (slots to reserve)."""
        cfg = self.config
        if cfg.tree == "dynamic":  # a request's max_depth may exceed ours: the builder caps it
            return 1 + min(max_depth, cfg.max_depth) * cfg.top_k * cfg.top_k
        if cfg.tree == "chain":  # the root and the chain's tokens run; side leaves never do
            return 1 + min(max_depth, cfg.max_depth)
        return 1 + max_tree_tokens

    def _builder(self, requests: list[DraftRequest]):
        roots = [r.token_ids[-1] for r in requests]
        budgets = [r.max_tree_tokens for r in requests]
        depths = [min(r.max_depth, self.config.max_depth) for r in requests]
        if self.config.tree == "dynamic":
            return DynamicTreeBuilder(roots, self.config.top_k, budgets, depths)
        if self.config.tree == "chain":
            return ChainTreeBuilder(roots, self.config.top_k, budgets, depths)
        return StaticTreeBuilder(roots, self.config.widths, budgets, depths)

    def propose(self, requests: list[DraftRequest]) -> list[TokenTree]:
        propose_start = time.perf_counter()
        prefix_lens = []
        for r in requests:
            cached = self.num_cached.get(r.seq_id)
            if cached is None:
                self.kv_manager.add_sequence(r.seq_id, list(r.token_ids))
                cached = 0
            cached = min(cached, len(r.token_ids) - 1)  # the root is always recomputed
            self.kv_manager.trim(r.seq_id, cached)
            chain_len = len(r.token_ids) - cached
            self.kv_manager.allocate_slots(
                r.seq_id, cached, chain_len + self.max_nodes_created(r.max_tree_tokens, r.max_depth)
            )
            prefix_lens.append(cached)

        # level 0: catch up and score the roots
        chains = [TokenTree.chain(list(r.token_ids[c:])) for r, c in zip(requests, prefix_lens)]
        items = [TreeBatchItem(r.seq_id, c, t) for r, c, t in zip(requests, prefix_lens, chains)]
        rows, row = [], 0
        for chain in chains:
            row += chain.num_nodes
            rows.append(row - 1)
        logits = self._score_chains(items, rows)
        builder = self._builder(requests)
        root_prefix = [len(r.token_ids) - 1 for r in requests]
        for r in requests:
            self.num_cached[r.seq_id] = len(r.token_ids)
        if isinstance(builder, ChainTreeBuilder) and self.fast_chain:
            self._propose_chain(requests, builder, logits, root_prefix)
            return self._finish(builder, requests, propose_start)
        candidates = top_candidates(logits, self.num_candidates)
        builder.extend([[candidates[s]] if builder.frontier()[s] else [] for s in range(len(requests))])

        # levels 1..: run root-to-frontier paths, extend by the frontier's candidates
        while any(builder.frontier()):
            active = [s for s, nodes in enumerate(builder.frontier()) if nodes]
            items, rows, row, per_seq_rows, needed_nodes = [], [], 0, [], []
            for s in active:
                needed = builder.needed_nodes(s)
                tree = builder.tree_of(s, needed)
                items.append(TreeBatchItem(requests[s].seq_id, root_prefix[s], tree))
                position = {node: i for i, node in enumerate(needed)}
                frontier_rows = [row + position[node] for node in builder.frontier()[s]]
                rows += frontier_rows
                per_seq_rows.append(len(frontier_rows))
                needed_nodes.append(needed)
                row += tree.num_nodes
            logits = self._score_level(items, rows, needed_nodes, [builder.frontier()[s] for s in active])
            flat = top_candidates(logits, self.num_candidates)
            per_seq: list[list[Candidates]] = [[] for _ in requests]
            start = 0
            for s, count in zip(active, per_seq_rows):
                per_seq[s] = flat[start : start + count]
                start += count
            builder.extend(per_seq)
        return self._finish(builder, requests, propose_start)

    def _finish(self, builder, requests: list[DraftRequest], propose_start: float) -> list[TokenTree]:
        if self.select_counts is None:
            return builder.trees()
        counts = self.select_counts(builder.path_probs(), time.perf_counter() - propose_start)
        return builder.trees([min(c, r.max_tree_tokens) for c, r in zip(counts, requests)])

    def _propose_chain(self, requests: list[DraftRequest], builder: ChainTreeBuilder, root_logits: torch.Tensor,
                       root_prefix: list[int]) -> None:
        """Grow chain trees with one read-back: level d (1 .. depth - 1) runs, for every sequence
        still that deep, its chain's depth-d token at position root + d, the token chosen on the
        device from level d-1's top candidates (level 0: the root's)."""
        depths = [min(r.max_depth, self.config.max_depth) if r.max_tree_tokens > 0 else 0 for r in requests]
        k = self.config.top_k
        active = [s for s, d in enumerate(depths) if d > 0]
        levels = [(active, *top_on_device(root_logits[active] if len(active) < len(requests) else root_logits, k))]
        states = self._chain_root_states([requests[s] for s in active])
        num_levels = max(depths, default=0) - 1
        done = 0  # levels run so far: every one, in one graph, when every chain is as deep and fits
        if self.chain_graphs is not None and num_levels >= 1 and all(depths[s] == num_levels + 1 for s in active):
            fused = self.chain_graphs.run([requests[s].seq_id for s in active], [root_prefix[s] for s in active],
                                          num_levels, levels[0][2][:, 0], states)
            if fused is not None:
                levels += [(active, values, ids) for values, ids in zip(*fused)]
                done = num_levels
        for level in range(done + 1, num_levels + 1):
            previous, _, ids = levels[-1]
            active = [s for s in previous if depths[s] > level]
            keep = None if len(active) == len(previous) else torch.tensor(
                [previous.index(s) for s in active], device=ids.device)
            tokens = ids[:, 0] if keep is None else ids[keep, 0]
            if states is not None and keep is not None:
                states = states[keep]
            items = [TreeBatchItem(requests[s].seq_id, root_prefix[s] + level, TokenTree.chain([0])) for s in active]
            logits, states = self._chain_level(items, tokens, states)
            levels.append((active, *top_on_device(logits, k)))
        values = torch.cat([v for _, v, _ in levels]).tolist()  # the one read-back
        indices = torch.cat([i for _, _, i in levels]).tolist()
        row = 0
        for seqs, _, _ in levels:
            candidates: list[list[Candidates]] = [[] for _ in requests]
            for s in seqs:
                candidates[s] = [list(zip(indices[row], values[row]))]
                row += 1
            builder.extend(candidates)

    fast_chain = True  # False: chain trees through the level-by-level loop (the reference, in tests)

    def _chain_root_states(self, requests: list[DraftRequest]) -> torch.Tensor | None:
        """What the chain's first token reads besides its id (a feature draft: the root's predicted
        state); None for a token-level draft."""
        return None

    def _chain_level(self, items: list[TreeBatchItem], tokens: torch.Tensor,
                     states: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One chain level: logits [len(items), vocab] of the one-token trees ``items`` run with
        ``tokens`` [len(items)] (on the device), and what the next level reads (None here)."""
        return self.runner.run(items, list(range(len(items))), input_ids=tokens)[0], None

    def _score_chains(self, items: list[TreeBatchItem], rows: list[int]) -> torch.Tensor:
        """Logits [len(rows), vocab] of the catch-up chains (each ends with its tree's root)."""
        return self.runner.run(items, rows)[0]

    def _score_level(
        self, items: list[TreeBatchItem], rows: list[int], needed: list[list[int]], frontier: list[list[int]]
    ) -> torch.Tensor:
        """Logits [len(rows), vocab] of one level's frontier nodes. items[i] is the tree of the
        builder nodes ``needed[i]`` (in that order) of one sequence; ``rows`` are the rows of
        ``frontier[i]``, sequence by sequence."""
        return self.runner.run(items, rows)[0]

    def commit(self, seq_id: str, num_committed: int) -> None:
        """Nothing to move: the next ``propose`` trims to the root and recomputes accepted tokens."""
        return None

    def observe(self, seq_id: str, first_position: int, states: torch.Tensor) -> None:
        return None

    def release(self, seq_id: str) -> None:
        self.kv_manager.free(seq_id)
        self.num_cached.pop(seq_id, None)
