"""bench.latency end to end on the CPU, CI-sized: ``python -m bench.latency`` with 2 prompts x 6
tokens on chat and random:16, our engine (off, ngram) against transformers (hf, hf-lookup);
files written, figures sane."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import latency

METHODS = ["off", "ngram", "hf", "hf-lookup"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("latency")
    argv = ["--prompt-set", "chat", "--prompt-set", "random:16", "--num-prompts", "2", "--max-tokens", str(MAX_TOKENS),
            "--methods", ",".join(METHODS), "--device", "cpu", "--kv-cache-memory", "0.05", "--warmup-tokens", "4",
            "--out-dir", str(out_dir), "--tag", "ci", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.latency", *argv], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out_dir, json.loads((out_dir / "latency_ci.json").read_text()), done.stdout


def test_files_are_written(run):
    out_dir, result, stdout = run
    assert result["prompt_sets"].keys() == {"chat", "random:16"}
    assert result["environment"]["torch"] and result["environment"]["device"].startswith("cpu")
    assert result["config"]["max_tokens"] == MAX_TOKENS and result["command"].startswith("python -m bench.latency")
    for png in ("latency_ci_token_latency.png", "latency_ci_accepted_length.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"-> {out_dir / png}" in stdout
    rows = [line.split()[0] for line in stdout.splitlines() if line.split()[:1] and line.split()[0] in METHODS]
    assert rows == METHODS * 2  # the table: one row per method per prompt set


def test_figures_are_sane(run):
    _, result, _ = run
    for set_name, prompt_set in result["prompt_sets"].items():
        assert list(prompt_set["methods"]) == METHODS
        assert prompt_set["num_prompts_measured"] == 2 and not prompt_set["truncated_by_time_budget"]
        for name, method in prompt_set["methods"].items():
            s = method["summary"]
            assert s["num_requests"] == 2 and s["num_tokens"] == 2 * MAX_TOKENS, (set_name, name)
            assert s["wall_s"] == sum(r["e2e_s"] for r in method["requests"])  # batch 1: groups one after another
            assert s["tokens_per_s"] == s["num_tokens"] / s["wall_s"]
            for key in ("token_latency_ms", "tpot_ms", "itl_ms", "ttft_ms"):
                assert 0 < s[key]["min"] <= s[key]["p50"] <= s[key]["p90"] <= s[key]["max"], (set_name, name, key)
            assert s["speedup_vs_off"] == s["tokens_per_s"] / prompt_set["methods"]["off"]["summary"]["tokens_per_s"]
            assert s["token_latency_speedup_vs_off"] > 0
            assert s["mean_accepted_length"] >= 1.0
            assert all(0 <= r <= 1 for r in s["acceptance_per_depth"])
            assert sum(s["accepted_length_histogram"]) == s["num_verify_steps"]
            assert 0 <= s["identical_to_off"] <= s["num_compared_to_off"] == 2
            for request in method["requests"]:
                assert sum(request["observation_num_tokens"]) == request["num_tokens"] == MAX_TOKENS
                assert request["ttft_s"] > 0 and request["e2e_s"] >= request["ttft_s"]
            if name in ("off", "ngram"):  # our engine: step timings, one step per observation after the first
                assert s["verify_ms_per_step"]["mean"] > 0 and s["draft_ms_per_step"]["mean"] >= 0
                assert s["num_decode_steps"] == s["num_verify_steps"]
            else:
                assert s["verify_ms_per_step"] is None and method["steps"] == []
        off, hf = prompt_set["methods"]["off"]["summary"], prompt_set["methods"]["hf"]["summary"]
        assert off["speedup_vs_off"] == 1.0 and off["mean_accepted_length"] == 1.0
        assert off["identical_to_off"] == 2 and off["mean_draft_tokens_per_step"] == 0
        # off: per prompt one prefill step, then one verification step per further token
        assert len(prompt_set["methods"]["off"]["steps"]) == 2 * MAX_TOKENS
        assert off["num_decode_steps"] == off["num_verify_steps"] == 2 * (MAX_TOKENS - 1)
        assert (off["accepted_length_histogram"], off["acceptance_per_depth"]) == ([2 * (MAX_TOKENS - 1)], [])
        # hf: every streamed token is a step of its own
        assert (hf["num_verify_steps"], hf["accepted_length_histogram"], hf["mean_accepted_length"]) == (
            2 * MAX_TOKENS, [2 * MAX_TOKENS], 1.0)


def test_user_mistakes_are_one_sentence(capsys):
    for argv, message in ((["--methods", "off,warp"], "unknown method 'warp'"),
                          (["--spec", "wide=ngram", "--methods", "off"], "does not list it"),
                          (["--max-tokens", "0"], "at least 1"),
                          (["--methods", "ngram,hf"], "must list off")):
        with pytest.raises(SystemExit):
            latency.parse_args(argv)
        assert message in capsys.readouterr().err
