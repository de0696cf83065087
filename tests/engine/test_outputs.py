"""StepStats: which steps ran decode trees only."""

from specserve.engine.outputs import StepStats


def test_is_decode_counts_a_row_per_root_and_per_draft():
    assert StepStats(3, 3 + 5, 5, 0.0, 0.0, 0.0).is_decode
    assert StepStats(1, 1, 0, 0.0, 0.0, 0.0).is_decode
    assert not StepStats(2, 40, 0, 0.0, 0.0, 0.0, num_prefills=1).is_decode  # a prefill chunk rode along
    assert not StepStats(1, 1, 0, 0.0, 0.0, 0.0, num_prefills=1).is_decode  # a cached prompt's last token
    assert not StepStats(2, 40, 0, 0.0, 0.0, 0.0).is_decode  # rows past the roots and drafts


def test_kind_is_prefill_drafting_or_plain():
    assert StepStats(3, 3 + 5, 5, 0.0, 0.0, 0.0).kind == "drafting"
    assert StepStats(3, 3, 0, 0.0, 0.0, 0.0).kind == "plain"
    assert StepStats(1, 1, 0, 0.0, 0.0, 0.0, num_prefills=1).kind == "prefill"
    assert StepStats(3, 40, 5, 0.0, 0.0, 0.0, num_prefills=1).kind == "prefill"  # drafts beside a prompt chunk
