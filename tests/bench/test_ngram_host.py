"""bench.ngram_host: the index and the scan propose the same trees (asserted inside); its report."""

import gc

import pytest

from bench import ngram_host


def test_small_run_reports_both_drafters_and_the_index_steps(capsys):
    argv = ["--num-seqs", "3", "--prompt-len", "40", "--steps", "5", "--freeze-heap"]
    assert ngram_host.main(argv) == 0
    out = capsys.readouterr().out
    assert "3 sequences, 40 + up to 15 tokens, 5 steps: scan" in out
    assert "index: first step" in out and "(model loaded: False, frozen: True" in out
    assert gc.get_freeze_count() == 0  # unfrozen again


def test_bad_sizes_are_refused():
    for argv in (["--num-seqs", "0"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            ngram_host.main(argv)


def test_corpus_lookups_report_and_bad_sets_are_refused(capsys):
    assert ngram_host.main(["--num-seqs", "1", "--steps", "1", "--corpus", "chat", "--corpus-tokens", "3000"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("corpus of ") and "documents of chat prompts): a prompt's first lookup" in line
    assert line.endswith("(best of 20, 60 prompts)")
    with pytest.raises(SystemExit):
        ngram_host.main(["--num-seqs", "1", "--steps", "1", "--corpus", "no-such-set"])
