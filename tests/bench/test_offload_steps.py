"""bench.offload_steps: its span merging, and a CPU smoke run."""

import pytest

from bench import offload_steps


def test_busy_spans_merge_gaps_under_the_threshold():
    events = [{"ts": 0, "dur": 10}, {"ts": 20, "dur": 10}, {"ts": 100, "dur": 5}, {"ts": 129, "dur": 1}]
    assert offload_steps.busy_spans(events) == [(0, 30, 2), (100, 130, 2)]
    assert offload_steps.busy_spans(events, merge_us=5) == [(0, 10, 1), (20, 30, 1), (100, 105, 1), (129, 130, 1)]


def test_step_medians_line():
    rows = [(17, 0.001, 0.003, 0.005), (1, 0.0, 0.002, 0.0025), (9, 0.002, 0.004, 0.007)]
    assert offload_steps.step_medians(rows) == (
        "3 steps, tokens 9, draft 1.000, verify 3.000, rest 1.000, total 5.000 ms (medians)")
    assert offload_steps.step_medians([]) == "none"


def test_cpu_smoke_run(capsys):
    argv = ["--num-buffers", "3", "--num-prompts", "2", "--max-tokens", "6", "--prompt-set", "chat"]
    assert offload_steps.main(argv) == 0
    out = capsys.readouterr().out
    assert "3 buffers, prompt 1, 6 tokens in" in out and "drafted steps:" in out and "plain steps:" in out


def test_bad_arguments_are_refused(capsys):
    for argv in (["--num-buffers", "1"], ["--prompt-set", "no/such/file.jsonl"]):
        with pytest.raises(SystemExit):
            offload_steps.main(argv)
    assert "--prompt-set:" in capsys.readouterr().err
