"""bench.plain_step_host: a CPU smoke run of its two measurements."""

import pytest

from bench import plain_step_host


def test_small_run_reports_propose_and_both_engines(capsys):
    assert plain_step_host.main(["--batch-size", "2", "--max-tokens", "4", "--rounds", "1", "--number", "5"]) == 0
    out = capsys.readouterr().out
    assert "propose, 2 sequences, plain step:" in out
    assert "off: step medians per round" in out and "ngram, gate closed: step medians per round" in out


def test_bad_sizes_are_refused():
    with pytest.raises(SystemExit):
        plain_step_host.main(["--batch-size", "0"])
