"""ServerMetrics' speculation counters grow by each output's difference to the previous one.

The per-depth loop is skipped when a step accepted no draft; that skip changes no counter (every
depth's delta is 0 then, since ``accepted_per_depth`` sums to ``num_accepted_tokens`` and only
grows), so this test guards the counters' values, not the skip itself. tests/engine/test_speculative.py
checks the invariant the skip relies on."""

import dataclasses

from specserve.engine.outputs import RequestOutput
from specserve.server.metrics import ServerMetrics


def output(num_steps: int, num_draft_tokens: int, num_accepted_tokens: int, accepted_per_depth: list[int],
           new_token_ids: list[int]) -> RequestOutput:
    return RequestOutput(request_id="r", text="", token_ids=[], new_token_ids=new_token_ids, num_prompt_tokens=3,
                         finished=False, finish_reason=None, num_steps=num_steps, num_draft_tokens=num_draft_tokens,
                         num_accepted_tokens=num_accepted_tokens, accepted_per_depth=accepted_per_depth)


def per_depth(metrics: ServerMetrics) -> list[float | None]:
    return [metrics.registry.get_sample_value("specserve_spec_decode_accepted_tokens_per_depth_total",
                                              {"depth": str(depth)}) for depth in (1, 2, 3)]


def test_accepted_per_depth_counters_move_by_the_step_s_accepted_drafts_only():
    metrics = ServerMetrics()
    metrics.record_outputs([output(1, 4, 2, [1, 1], [7, 8, 9])], now=1.0)  # a drafting step: depths 1 and 2
    assert per_depth(metrics) == [1.0, 1.0, None]
    metrics.record_outputs([output(2, 4, 2, [1, 1], [10])], now=2.0)  # a plain step: nothing accepted
    assert per_depth(metrics) == [1.0, 1.0, None]
    metrics.record_outputs([output(3, 8, 5, [2, 2, 1], [11, 12, 13, 14])], now=3.0)  # 3 drafts: depths 1, 2, 3
    assert per_depth(metrics) == [2.0, 2.0, 1.0]
    assert metrics.registry.get_sample_value("specserve_spec_decode_accepted_tokens_total") == 5.0
    assert metrics.registry.get_sample_value("specserve_spec_decode_steps_total") == 3.0
    assert metrics.registry.get_sample_value("specserve_spec_decode_mean_accepted_length") == 1.0 + 5 / 3



def test_one_call_sums_every_output_s_speculation_deltas():
    metrics = ServerMetrics()

    def out(request_id, steps, drafts, accepted, per_depth):
        return dataclasses.replace(output(steps, drafts, accepted, per_depth, [1]), request_id=request_id)

    metrics.record_outputs([out("a", 1, 4, 2, [1, 1]), out("b", 1, 3, 0, []), out("c", 1, 0, 0, [])], now=1.0)
    metrics.record_outputs([out("a", 2, 4, 2, [1, 1]), out("b", 2, 5, 1, [1])], now=2.0)
    value = metrics.registry.get_sample_value
    assert value("specserve_spec_decode_steps_total") == 5.0
    assert value("specserve_spec_decode_draft_tokens_total") == 9.0  # 4 + 3, then b's 2 more
    assert value("specserve_spec_decode_accepted_tokens_total") == 3.0
    assert value("specserve_spec_decode_mean_accepted_length") == 1.0 + 3 / 5
    assert per_depth(metrics) == [2.0, 1.0, None]


def test_eager_steps_are_counted_by_kind():
    """specserve_engine_eager_steps: steps whose target forward fit no CUDA-graph bucket."""
    from specserve.engine.outputs import StepStats

    metrics = ServerMetrics()
    metrics.record_step(StepStats(2, 140, 0, 0.0, 0.0, 0.01, num_prefills=1, eager_forward=True))
    metrics.record_step(StepStats(3, 3 + 9, 9, 0.0, 0.0, 0.01, eager_forward=True))
    metrics.record_step(StepStats(3, 3, 0, 0.0, 0.0, 0.01))
    counts = [metrics.registry.get_sample_value("specserve_engine_eager_steps_total", {"kind": kind})
              for kind in ("prefill", "drafting", "plain")]
    assert counts == [1.0, 1.0, 0.0]
