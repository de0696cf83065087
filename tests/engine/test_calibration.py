import json

import pytest

from specserve.config import CacheConfig, EngineConfig, SamplingParams, SpeculativeConfig
from specserve.engine.calibration import StepCost, measure_step_cost, select_nodes_by_cost
from specserve.engine.llm_engine import LLMEngine


def test_step_cost_interpolates_and_extrapolates():
    cost = StepCost((1, 4, 8), (1.0, 1.0, 2.0))
    assert [cost(n) for n in (0, 1, 2, 4, 6, 8, 12)] == [1.0, 1.0, 1.0, 1.0, 1.5, 2.0, 3.0]
    assert StepCost.from_json(cost.to_json()) == cost


def test_selection_keeps_nodes_while_they_pay_for_themselves():
    flat_then_steep = StepCost((1, 4, 5, 8), (1.0, 1.0, 2.0, 5.0))
    # batch of 2: the 2 roots cost 1.0; 2 more nodes stay at 1.0 (4 tokens), a 3rd doubles it
    assert select_nodes_by_cost(flat_then_steep, [[0.9, 0.5], [0.8, 0.1]]) == [1, 1]
    # very likely nodes make the jump to 5 tokens worth it: (2 + 2.97) / 2.0 > (2 + 1.98) / 1.0? no
    assert select_nodes_by_cost(flat_then_steep, [[0.99, 0.99], [0.99]]) == [1, 1]
    # drafting time counts: with 10 s of drafting the extra token costs little relative
    assert select_nodes_by_cost(flat_then_steep, [[0.99, 0.99], [0.99]], draft_s=10.0) == [2, 1]
    assert select_nodes_by_cost(StepCost((1, 2), (1.0, 2.0)), [[0.4]]) == [0]


@pytest.mark.parametrize(("seconds", "expect_drafts"), [((1.0, 1.0, 1.0), True), ((1.0, 50.0, 100.0), False)])
def test_auto_budget_in_the_engine_follows_the_cost_curve(smollm, tmp_path, seconds, expect_drafts):
    cost_file = tmp_path / "cost.json"
    cost_file.write_text(json.dumps({"sizes": [1, 8, 16], "seconds": list(seconds)}))
    spec = SpeculativeConfig(method="early_exit", num_layers=2, tree="dynamic", top_k=2, max_tree_tokens=4,
                             max_depth=2, budget="auto", step_cost=str(cost_file))
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64), speculative=spec), loaded=smollm)
    out = engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    assert (out.num_draft_tokens > 0) == expect_drafts


def test_measured_cost_is_positive_and_cached(smollm, tmp_path):
    engine = LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64)), loaded=smollm)
    cost = measure_step_cost(engine.runner, sizes=(1, 4), repeats=1)
    assert cost.sizes == (1, 4) and all(s > 0 for s in cost.seconds)
    assert engine.kv_manager.pool.num_free_blocks == 64


def test_calibration_is_cached_per_execution_mode(smollm, tmp_path, monkeypatch):
    """The cost curve is cached under a name that says eager or graphs (CUDA graphs cut a step's
    cost ~10x on the H100; a curve measured eagerly would make every tree look cheap)."""
    monkeypatch.setenv("SPECSERVE_CACHE_DIR", str(tmp_path))
    spec = SpeculativeConfig(method="ngram", max_tree_tokens=2)
    LLMEngine(EngineConfig(cache=CacheConfig(num_blocks=64), speculative=spec), loaded=smollm)
    files = [p.name for p in (tmp_path / "calibration").iterdir()]
    assert len(files) == 1 and "-bs16-eager-" in files[0], files
