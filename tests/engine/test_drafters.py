"""The merged drafter serves each request only the drafters its policy names."""

import pytest

from draft_models.base import DraftRequest
from specserve.config import SpeculativeConfig
from specserve.engine.drafters import MergedDrafter
from specserve.errors import SpecserveError
from specserve.tree import TokenTree
from specserve.tree.builders import tree_from_paths_within_budget


class FixedDrafter:
    """Proposes one fixed path; records the budgets it was asked for."""

    needs_target_states = False

    def __init__(self, path: list[int]) -> None:
        self.path = path
        self.budgets: list[tuple[str, int]] = []

    def propose(self, requests: list[DraftRequest]) -> list[TokenTree]:
        self.budgets += [(r.seq_id, r.max_tree_tokens) for r in requests]
        return [tree_from_paths_within_budget(r.token_ids[-1], [self.path], r.max_tree_tokens) for r in requests]

    def commit(self, seq_id: str, num_committed: int) -> None:
        return None

    def release(self, seq_id: str) -> None:
        return None


def test_each_request_gets_trees_from_its_own_drafters_only():
    ngram, early = FixedDrafter([1, 2]), FixedDrafter([3, 4])
    merged = MergedDrafter([ngram, early], ("ngram", "early_exit"))
    requests = [DraftRequest("a", [9], 4, 2), DraftRequest("b", [9], 4, 2, ("ngram",)),
                DraftRequest("c", [9], 4, 2, ("early_exit", "draft"))]
    trees = merged.propose(requests)
    assert trees[0] == TokenTree.from_paths(9, [[1, 2], [3, 4]])
    assert trees[1] == TokenTree.from_paths(9, [[1, 2]])
    assert trees[2] == TokenTree.from_paths(9, [[3, 4]])
    # a drafter left out still sees the request, with nothing to propose (model drafters keep up)
    assert ngram.budgets == [("a", 4), ("b", 4), ("c", 0)]
    assert early.budgets == [("a", 4), ("b", 0), ("c", 4)]


def test_merge_members_name_several_trained_drafts():
    cfg = SpeculativeConfig.parse(
        '{"method": "merge", "merge": ["draft:d1", "draft:/tmp/d2", "ngram"], "tree": "dynamic", "max_depth": 5}'
    )
    members = [cfg.with_method(m) for m in cfg.merge]
    assert [(m.method, m.draft_model, m.merge, m.tree, m.max_depth) for m in members] == [
        ("draft", "d1", (), "dynamic", 5), ("draft", "/tmp/d2", (), "dynamic", 5), ("ngram", None, (), "dynamic", 5),
    ]
    assert cfg.member_kinds == ("draft", "draft", "ngram") and cfg.drafter_names == ("draft", "ngram")
    for bad in (["ngram"], ["ngram", "draft:"], ["ngram", "beam"], ["ngram", 3]):
        with pytest.raises(SpecserveError, match="merge"):
            SpeculativeConfig(method="merge", merge=tuple(bad))


def test_ngram_score_and_merge_rule_reach_the_drafters_and_bad_values_are_refused():
    from specserve.engine.drafters import make_drafter

    cfg = SpeculativeConfig.parse('{"method": "merge", "merge": ["ngram", "ngram"], "ngram_score": 0.6, '
                                  '"merge_rule": "noisy_or"}')
    merged = make_drafter(cfg, loaded=None, num_blocks=8, block_size=4, max_num_seqs=2)
    assert merged.rule == "noisy_or" and [d.score for d in merged.drafters] == [0.6, 0.6]
    assert make_drafter(SpeculativeConfig(method="ngram"), None, 8, 4, 2).score is None
    for field, bad in (("ngram_score", 0), ("ngram_score", 1.5), ("ngram_score", True), ("ngram_score", "0.5"),
                       ("merge_rule", "sum")):
        with pytest.raises(SpecserveError, match=field):
            SpeculativeConfig(method="ngram", **{field: bad})
