"""bench.acceptance: the summary arithmetic on synthetic records, and a CI-sized CPU run."""

from __future__ import annotations

import json

import pytest

from bench import acceptance


def _record(steps, drafted, accepted, per_depth, tokens, same=True):
    return {"num_steps": steps, "num_draft_tokens": drafted, "num_accepted_tokens": accepted,
            "accepted_per_depth": per_depth, "num_generated_tokens": tokens, "identical_to_off": same}


def test_summary_of_synthetic_records():
    records = [_record(4, 16, 6, [3, 2, 1], 10), _record(6, 12, 2, [2], 8, same=False)]
    summary = acceptance.summarise_acceptance(records)
    assert summary == {
        "num_requests": 2, "num_steps": 10, "num_generated_tokens": 18,
        "mean_accepted_length": 1.8,  # 1 + 8 / 10
        "acceptance_per_depth": [0.5, 0.2, 0.1],  # (3 + 2) / 10, 2 / 10, 1 / 10
        "draft_tokens_per_step": 2.8, "identical_to_off": 1,
    }
    assert acceptance.summarise_acceptance([])["mean_accepted_length"] is None


def test_methods_parse_and_bad_ones_are_one_sentence():
    methods = acceptance.parse_methods(['ng={"method": "ngram", "max_tree_tokens": 8}', "ee=early_exit"])
    assert list(methods) == ["ng", "ee"]
    assert methods["ng"].max_tree_tokens == 8 and methods["ee"].method == "early_exit"
    assert not methods["ng"].switch_off  # the drafter's own acceptance
    for bad in ["ngram", "off=ngram", "x=off", 'x={"method": "nope"}']:
        with pytest.raises(ValueError, match="--method"):
            acceptance.parse_methods([bad])
    with pytest.raises(ValueError, match="twice"):
        acceptance.parse_methods(["a=ngram", "a=ngram"])


@pytest.mark.slow
def test_cpu_run_writes_figures_that_add_up(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--prompt-set", "chat", "--num-prompts", "2", "--max-tokens", "8", "--max-num-seqs", "2",
            "--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "0.05",
            "--method", 'ng={"method": "ngram", "max_tree_tokens": 8, "max_depth": 4}',
            "--out-dir", str(tmp_path), "--tag", "ci"]
    assert acceptance.main(argv) == 0
    saved = json.loads((tmp_path / "acceptance_ci.json").read_text())
    assert (tmp_path / "acceptance_ci.png").stat().st_size > 0
    block = saved["results"]["chat"]
    assert block["num_prompts"] == 2 and list(block["methods"]) == ["off", "ng"]
    off, ng = block["methods"]["off"], block["methods"]["ng"]
    assert off["mean_accepted_length"] == 1.0 and off["num_steps"] == off["num_generated_tokens"] - 2
    assert ng["identical_to_off"] == 2  # greedy fp32: speculation never changes the tokens
    assert ng["requests"][0]["token_ids"] == off["requests"][0]["token_ids"]
    assert ng["mean_accepted_length"] == acceptance.summarise_acceptance(ng["requests"])["mean_accepted_length"]
    assert len(ng["acceptance_per_depth"]) <= 4
    assert acceptance.main(["--method", "bad"]) == 2
