"""The drafter of a feature-level draft (``feature_draft``): a ``ModelDrafter`` whose draft model
also reads the target's hidden states.

The engine hands over the target's final-norm hidden state of every token it commits
(``observe``); position p's state h_p is read by the draft at position p + 1. Per ``propose``:

1. catch up: the chain of tokens committed since the last call, ending with the root, reads
   the target's real states h_{p-1}; the root's predicted state f_root gives the first
   candidates;
2. every level runs the root-to-frontier paths again, node u reading its parent's predicted
   state (the root reading h_{root-1}), and keeps the frontier's predicted states for the
   level after.

Invariant: ``states[seq]`` holds the target states observed for positions from
``num_cached[seq] - 1`` on (what the next catch-up reads). A position the target never
computed for this sequence (a prefix taken from the prefix cache, or position -1) reads zeros.
Draft-side K/V follow ``ModelDrafter``'s rollback (trim to the root, recompute the accepted).
With graph buckets, steps that fit run padded from static buffers (CUDA graphs on CUDA), the
states read travelling in the runner's feature buffer (``cuda_graphs``); a chain step's levels
then run as one graph, each level reading the states the level before predicted, on the device
(``chain_graphs``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from draft_models.feature_draft import FeatureDraft
from draft_models.model_drafter import ModelDrafter
from specserve.config import SpeculativeConfig
from specserve.engine.cuda_graphs import GraphBuckets
from specserve.engine.model_runner import TreeBatchItem


class FeatureDrafter(ModelDrafter):
    needs_target_states = True

    def __init__(
        self,
        model: FeatureDraft,
        config: SpeculativeConfig,
        num_blocks: int,
        block_size: int,
        select_counts: Callable[[list[list[float]], float], list[int]] | None = None,
        graph_buckets: GraphBuckets | None = None,
    ) -> None:
        super().__init__(model, model.cfg.num_layers, config, num_blocks, block_size, select_counts, graph_buckets,
                         feature_size=model.cfg.hidden_size)
        self.model = model
        self.states: dict[str, tuple[int, torch.Tensor]] = {}  # seq -> (first position, [n, hidden])
        # within one propose: per sequence, the read of its root and the predicted state of every
        # builder node scored so far
        self._root_reads: dict[str, torch.Tensor] = {}  # [hidden]
        self._predicted: dict[str, dict[int, torch.Tensor]] = {}  # node -> [hidden]

    def observe(self, seq_id: str, first_position: int, states: torch.Tensor) -> None:
        """states [n, hidden]: the target's states at positions first_position .. + n - 1 (which
        replace any kept for those positions and later)."""
        kept = self.states.get(seq_id)
        if kept is not None and kept[0] <= first_position:
            start, old = kept
            gap = first_position - (start + len(old))
            if gap > 0:
                old = torch.cat([old, old.new_zeros(gap, old.shape[1])])
            states = torch.cat([old[: first_position - start], states.to(old.dtype)])
            first_position = start
        self.states[seq_id] = (first_position, states)

    def _reads(self, seq_id: str, first_position: int, count: int) -> torch.Tensor:
        """[count, hidden]: the target's states at first_position .. + count - 1 (zeros where none)."""
        hidden = self.model.cfg.hidden_size
        out = self.kv_cache.kv.new_zeros(count, hidden)
        kept = self.states.get(seq_id)
        if kept is not None:
            start, states = kept
            lo, hi = max(first_position, start), min(first_position + count, start + len(states))
            if lo < hi:
                out[lo - first_position : hi - first_position] = states[lo - start : hi - start]
        return out

    def _states(self, items: list[TreeBatchItem], reads: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft's logits [len(rows), vocab] at ``rows`` and predicted states [num_tokens,
        hidden] of every row of ``items`` (reads [num_tokens, hidden]: the state each row reads)."""
        return self.runner.run(items, rows, return_hidden=True, features=reads)

    def _score_chains(self, items: list[TreeBatchItem], rows: list[int]) -> torch.Tensor:
        self._root_reads, self._predicted = {}, {}
        reads = [self._reads(item.seq_id, item.prefix_len - 1, item.tree.num_nodes) for item in items]
        logits, states = self._states(items, torch.cat(reads), rows)
        for item, read, row in zip(items, reads, rows):
            self._root_reads[item.seq_id] = read[-1]
            self._predicted[item.seq_id] = {0: states[row]}
            root = item.prefix_len + item.tree.num_nodes - 1
            kept = self.states.get(item.seq_id)
            if kept is not None and kept[0] < root:  # the next catch-up reads from the root's state on
                self.states[item.seq_id] = (root, kept[1][root - kept[0] :])
        return logits

    def _score_level(
        self, items: list[TreeBatchItem], rows: list[int], needed: list[list[int]], frontier: list[list[int]]
    ) -> torch.Tensor:
        reads = []
        for item, nodes in zip(items, needed):
            predicted = self._predicted[item.seq_id]
            root_read = self._root_reads[item.seq_id]
            reads += [root_read if parent < 0 else predicted[nodes[parent]] for parent in item.tree.parents]
        logits, states = self._states(items, torch.stack(reads), rows)
        frontier_states = states[rows]
        row = 0
        for item, nodes in zip(items, frontier):
            for node in nodes:
                self._predicted[item.seq_id][node] = frontier_states[row]
                row += 1
        return logits

    def _chain_root_states(self, requests) -> torch.Tensor:
        return torch.stack([self._predicted[r.seq_id][0] for r in requests])

    def _chain_level(self, items: list[TreeBatchItem], tokens: torch.Tensor,
                     states: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A chain token reads its parent's predicted state (``states``) and predicts its own."""
        logits, predicted = self.runner.run(items, list(range(len(items))), return_hidden=True, features=states,
                                            input_ids=tokens)
        return logits, predicted

    def release(self, seq_id: str) -> None:
        super().release(seq_id)
        self.states.pop(seq_id, None)
