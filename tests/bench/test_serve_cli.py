"""bench.serve end to end on the CPU, CI-sized: a real ``specserve serve`` (default model, ngram
speculation, an API key), ``python -m bench.serve`` at three request rates, 3 requests x 6 tokens
each over the chat set (chat endpoint) and random:16 (completions with token ids)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import serve
from tests.server.conftest import ServerProcess, free_port

API_KEY = "sk-bench-key"
NUM_PROMPTS = 3
MAX_TOKENS = 6
RATES = [4.0, 16.0, "inf"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(log, "--served-model-name", "smol", "--api-key", API_KEY, "--speculative-config", "ngram")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def run(server, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("serve")
    argv = ["--base-url", server.base_url, "--api-key", API_KEY, "--wait-ready", "30",
            "--prompt-set", "chat", "--prompt-set", "random:16", "--num-prompts", str(NUM_PROMPTS),
            "--max-tokens", str(MAX_TOKENS), "--request-rate", "4,16,inf", "--max-concurrency", "2",
            "--goodput", "ttft:600000", "e2e:600000", "--spec-stats", "--warmup-tokens", "4",
            "--out-dir", str(out_dir), "--tag", "ci"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.serve", *argv], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:] + server.log()
    return out_dir, json.loads((out_dir / "serve_ci.json").read_text()), done


def test_files_are_written_without_the_key(run):
    out_dir, result, done = run
    assert (out_dir / "serve_ci_latency_vs_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert API_KEY not in (out_dir / "serve_ci.json").read_text()
    assert "api_key" not in result["config"] and "--api-key REDACTED" in result["command"]
    assert result["config"]["served_model"] == "smol"
    assert result["config"]["endpoints"] == {"chat": "chat", "random:16": "completions"}
    assert result["environment"]["torch"] and result["environment"]["device"].startswith("cpu")
    assert all(f"rate {rate}: 100%" in done.stderr for rate in ("4", "16", "inf"))  # a tqdm bar per rate
    table = done.stdout.splitlines()
    assert [line.split()[:3] for line in table if line.strip().split()[:1] in (["4"], ["16"], ["inf"])] == [
        ["4", "3", "0"], ["16", "3", "0"], ["inf", "3", "0"]]


def test_prompts_interleave_and_continue_across_rates(run):
    _, result, _ = run
    sent = [[(r["prompt_set"], r["prompt_index"]) for r in run_["requests"]] for run_ in result["runs"]]
    assert sent == [[("chat", 0), ("random:16", 0), ("chat", 1)],
                    [("random:16", 1), ("chat", 2), ("random:16", 2)],
                    [("chat", 3), ("random:16", 3), ("chat", 4)]]


def test_every_request_succeeds_with_exact_token_counts(run):
    _, result, _ = run
    assert [run_["request_rate"] for run_ in result["runs"]] == RATES
    for run_ in result["runs"]:
        for r in run_["requests"]:
            assert (r["ok"], r["status"], r["error"]) == (True, 200, None)
            assert r["num_tokens"] == MAX_TOKENS and r["num_tokens_from_usage"]
            if r["prompt_set"] == "random:16":
                assert r["num_prompt_tokens"] == 16
            times = r["chunk_times_s"]
            assert times and times == sorted(times) and times[-1] <= r["e2e_s"]
            assert r["ttft_s"] == times[0] and r["itl_s"] == [b - a for a, b in zip(times, times[1:])]
            assert r["tpot_s"] == (r["e2e_s"] - r["ttft_s"]) / (MAX_TOKENS - 1)
            assert 0 <= r["send_s"] < r["end_s"] and r["e2e_s"] <= r["end_s"] - r["send_s"]
            stats = r["spec_stats"]
            assert stats["num_steps"] >= 1 and sum(stats["accepted_per_depth"]) == stats["num_accepted_tokens"]


def test_summaries_are_sane(run):
    _, result, _ = run
    for run_ in result["runs"]:
        s, requests = run_["summary"], run_["requests"]
        assert (s["num_requests"], s["num_completed"], s["num_failed"], s["failures"]) == (NUM_PROMPTS, NUM_PROMPTS, 0, {})
        assert 1 <= s["max_in_flight"] <= 2  # --max-concurrency 2
        assert s["duration_s"] == max(r["end_s"] for r in requests)
        assert s["num_output_tokens"] == NUM_PROMPTS * MAX_TOKENS
        assert s["num_prompt_tokens"] == sum(r["num_prompt_tokens"] for r in requests)
        assert s["request_throughput"] == NUM_PROMPTS / s["duration_s"]
        assert s["output_throughput"] == NUM_PROMPTS * MAX_TOKENS / s["duration_s"]
        assert s["total_token_throughput"] == (s["num_output_tokens"] + s["num_prompt_tokens"]) / s["duration_s"]
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            f = s[key]
            assert 0 < f["min"] <= f["p50"] <= f["p90"] <= f["p99"] <= f["max"], key
            assert f["min"] <= f["mean"] <= f["max"], key
        assert s["e2e_ms"]["max"] == 1000 * max(r["e2e_s"] for r in requests)
        assert s["ttft_ms"]["max"] <= s["e2e_ms"]["max"]
        assert (s["slos_ms"], s["num_good"], s["goodput"]) == ({"ttft": 600000.0, "e2e": 600000.0}, NUM_PROMPTS,
                                                               s["request_throughput"])
        assert s["mean_accepted_length"] >= 1.0 and all(0 <= a <= 1 for a in s["acceptance_per_depth"])


def test_an_absent_server_is_one_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit, match="did not answer /health or /v1/models with 200 within 1 s"):
        serve.main(["--base-url", f"http://127.0.0.1:{free_port()}", "--wait-ready", "1", "--num-prompts", "1",
                    "--out-dir", str(tmp_path), "--no-progress"])
    assert not list(tmp_path.iterdir())


def test_user_mistakes_are_one_sentence(capsys):
    for argv, message in ((["--request-rate", "0"], "positive rates"),
                          (["--request-rate", "fast"], "bad --request-rate"),
                          (["--goodput", "latency:5"], "bad SLO"),
                          (["--max-concurrency", "0"], "at least 1"),
                          (["--api", "sk-x"], "unrecognized arguments")):  # no abbreviations
        with pytest.raises(SystemExit):
            serve.parse_args(argv)
        assert message in capsys.readouterr().err


def test_redacted_argv():
    assert serve.redacted_argv(["--api-key", "sk-1", "--tag", "x", "--api-key=sk-2"]) == [
        "--api-key", "REDACTED", "--tag", "x", "--api-key=REDACTED"]
