"""Build the drafter a SpeculativeConfig names, with the KV pool it needs."""

from __future__ import annotations

from dataclasses import replace

from draft_models.base import Drafter, DraftRequest
from specserve.config import SpeculativeConfig
from specserve.errors import SpecserveError
from specserve.models.loader import LoadedModel
from specserve.tree import TokenTree
from specserve.tree.builders import merge_trees


class MergedDrafter:
    """SpecInfer's merge-based tree: every drafter proposes with the full budget, and their
    trees are merged (identical paths once) and cut back to the budget. A request that names
    its ``drafters`` gets nothing from the others (they still see it, with a zero budget, so a
    model drafter's cache keeps up with the sequence)."""

    def __init__(self, drafters: list[Drafter], names: tuple[str, ...], rule: str = "max") -> None:
        """``rule``: how a node several members propose scores (``merge_trees``)."""
        if len(drafters) != len(names):
            raise ValueError("one name per merged drafter")
        self.drafters = drafters
        self.names = names
        self.rule = rule
        self.needs_target_states = any(d.needs_target_states for d in drafters)

    def propose(self, requests: list[DraftRequest]) -> list[TokenTree]:
        proposals = [
            drafter.propose([r if r.drafters is None or name in r.drafters else replace(r, max_tree_tokens=0)
                             for r in requests])
            for drafter, name in zip(self.drafters, self.names)
        ]
        return [
            merge_trees([trees[i] for trees in proposals], request.max_tree_tokens, self.rule)
            for i, request in enumerate(requests)
        ]

    def commit(self, seq_id: str, num_committed: int) -> None:
        for drafter in self.drafters:
            drafter.commit(seq_id, num_committed)

    def observe(self, seq_id: str, first_position: int, states) -> None:
        for drafter in self.drafters:
            if drafter.needs_target_states:
                drafter.observe(seq_id, first_position, states)

    def release(self, seq_id: str) -> None:
        for drafter in self.drafters:
            drafter.release(seq_id)


def drafter_kv_layers(cfg: SpeculativeConfig, loaded: LoadedModel) -> int:
    """Layers of K/V a drafter mirrors for every committed token (0 for model-free drafters),
    counted in the target's KV shape, so the engine can size both pools from one budget."""
    if cfg.method == "merge":
        return sum(drafter_kv_layers(cfg.with_method(m), loaded) for m in cfg.merge)
    if cfg.method == "early_exit":
        return cfg.num_layers
    if cfg.method == "draft":
        from draft_models.small_draft import draft_kv_layers_equivalent

        return draft_kv_layers_equivalent(cfg.draft_model, loaded)
    return 0


def make_drafter(
    cfg: SpeculativeConfig,
    loaded: LoadedModel,
    num_blocks: int,
    block_size: int,
    max_num_seqs: int,
    select_counts=None,
    graph_buckets=None,
) -> Drafter | None:
    """``num_blocks``: the target's KV pool size; model drafters get as many blocks again for the
    committed tokens they mirror, plus room for every running sequence's largest tree.
    ``graph_buckets``: model drafters' steps that fit one run padded, as CUDA graphs on CUDA."""
    if cfg.method == "off":
        return None
    if cfg.method == "merge":
        return MergedDrafter([make_drafter(cfg.with_method(m), loaded, num_blocks, block_size, max_num_seqs,
                                           select_counts, graph_buckets) for m in cfg.merge], cfg.member_kinds,
                             cfg.merge_rule)
    if cfg.method == "ngram":
        from draft_models.ngram import NgramDrafter

        return NgramDrafter(cfg.ngram_max, cfg.ngram_min, max_paths=max(cfg.widths), corpus_tokens=cfg.ngram_corpus,
                            score=cfg.ngram_score)
    from draft_models.model_drafter import ModelDrafter

    tree_slots = 1 + cfg.max_depth * max(cfg.top_k, max(cfg.widths)) ** 2 + cfg.max_tree_tokens
    draft_blocks = num_blocks + max_num_seqs * (-(-tree_slots // block_size) + 1)
    if cfg.method == "early_exit":
        if cfg.num_layers > loaded.arch.num_layers:
            raise SpecserveError(
                f"early_exit num_layers must be at most the target's {loaded.arch.num_layers} layers"
            )
        return ModelDrafter(loaded.model, cfg.num_layers, cfg, draft_blocks, block_size, select_counts,
                            graph_buckets)
    if cfg.method == "draft":
        from draft_models.feature_draft import FeatureDraft
        from draft_models.small_draft import load_draft

        draft = load_draft(cfg.draft_model, loaded)
        if isinstance(draft, FeatureDraft):
            from draft_models.feature_drafter import FeatureDrafter

            return FeatureDrafter(draft, cfg, draft_blocks, block_size, select_counts, graph_buckets)
        return ModelDrafter(draft, draft.cfg.num_layers, cfg, draft_blocks, block_size, select_counts,
                            graph_buckets)
    raise SpecserveError(f"speculative method {cfg.method!r} is not available")
