"""bench.step_profile: the per-step comparison of engines, CI-sized on the CPU, and its input errors."""

from __future__ import annotations

import json

from bench import step_profile


def test_cpu_run_compares_each_engine_with_the_off_engine(tmp_path, capsys):
    out = tmp_path / "profile.json"
    argv = ["--device", "cpu", "--max-tokens", "3", "--kv-cache-memory", "0.05", "--spec", "ngram=ngram",
            "--out", str(out)]
    assert step_profile.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["off", "ngram"]
    assert list(results["off"]) == ["no drafting"]
    assert list(results["ngram"]) == ["no drafting", "switched off", "drafting"]
    for modes in results.values():
        for figures in modes.values():
            assert figures["num_steps"] == 2 and figures["median_step_ms"] > 0
            assert figures["ops_per_step"] > 0 and figures["cuda_kernels_per_step"] == figures["cuda_kernel_ms_per_step"] == 0
    switched_off = {mode: figures["switched_off_steps"] for mode, figures in results["ngram"].items()}
    assert switched_off["no drafting"] == switched_off["drafting"] == 0 and switched_off["switched off"] >= 2
    for figures in results["ngram"].values():
        rows = figures["largest_differences_from_off"]
        assert 0 < len(rows) <= step_profile.TOP_OPS and all(len(row) == 3 for row in rows)
    assert "ngram" in capsys.readouterr().out


def test_a_batch_of_eight_also_profiles_steps_the_gate_keeps_plain(tmp_path):
    out = tmp_path / "profile.json"
    argv = ["--device", "cpu", "--max-tokens", "3", "--profile-tokens", "2", "--batch-size", "8", "--temperature", "0",
            "--kv-cache-memory", "0.05", "--spec", "ngram=ngram", "--out", str(out)]
    assert step_profile.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results["ngram"]) == ["no drafting", "switched off", "gate closed", "drafting"]
    assert results["ngram"]["gate closed"]["num_steps"] >= 2


def test_bad_input_is_one_line_and_exit_2(capsys):
    for argv, needle in ((["--spec", "ngram"], "NAME=CONFIG"), (["--spec", "x=beam"], "speculative method"),
                         (["--max-tokens", "1"], "--max-tokens"), (["--profile-tokens", "1"], "--profile-tokens"), (["--batch-size", "0"], "--batch-size"), (["--prompt-set", "nope"], "unknown prompt set")):
        assert step_profile.main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
