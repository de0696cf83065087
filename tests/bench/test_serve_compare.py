"""bench.serve_compare: the run order, the paired summary, argument errors, and (slow) one real
comparison on the CPU: two fresh ``specserve serve`` children, off then ngram, 2 requests x 4 tokens."""

from __future__ import annotations

import json
import socket

import pytest

from bench import serve_compare
from bench.serve_compare import ComparePlan, Slot, Spec, kept_metrics, paired_summary, run_order
from tests.server.conftest import free_port

OFF, NGRAM = Spec("off", "off"), Spec("ngram", "ngram")


def test_alternate_order_rotates_the_specs_each_repeat():
    plan = ComparePlan((OFF, NGRAM), (16, 32), repeats=3)
    assert [(s.run_index, s.repeat, s.concurrency, s.spec, s.order_index) for s in run_order(plan)] == [
        (0, 0, 16, "off", 0), (1, 0, 16, "ngram", 1), (2, 0, 32, "off", 0), (3, 0, 32, "ngram", 1),
        (4, 1, 16, "ngram", 0), (5, 1, 16, "off", 1), (6, 1, 32, "ngram", 0), (7, 1, 32, "off", 1),
        (8, 2, 16, "off", 0), (9, 2, 16, "ngram", 1), (10, 2, 32, "off", 0), (11, 2, 32, "ngram", 1)]


def test_three_specs_each_go_first_once_in_three_repeats():
    plan = ComparePlan((OFF, NGRAM, Spec("tree", '{"method": "ngram", "max_tree_tokens": 8}')), (4,), repeats=3)
    assert [s.spec for s in run_order(plan)] == ["off", "ngram", "tree", "ngram", "tree", "off", "tree", "off", "ngram"]


def test_fixed_order_keeps_the_given_order():
    plan = ComparePlan((NGRAM, OFF), (8,), repeats=2, order="fixed")
    assert run_order(plan) == [Slot(0, 0, 8, "ngram", 0), Slot(1, 0, 8, "off", 1),
                               Slot(2, 1, 8, "ngram", 0), Slot(3, 1, 8, "off", 1)]


def record(spec: str, concurrency: int, repeat: int, tokens_per_s: float, num_failed: int = 0) -> dict:
    return {"spec": spec, "concurrency": concurrency, "repeat": repeat, "output_throughput": tokens_per_s,
            "num_failed": num_failed}


def test_ratios_are_paired_by_repeat():
    plan = ComparePlan((OFF, NGRAM), (16, 32), repeats=3)
    runs = [record("off", 16, 0, 100.0), record("ngram", 16, 0, 75.0),
            record("off", 32, 0, 200.0), record("ngram", 32, 0, 250.0),
            record("ngram", 16, 1, 104.0), record("off", 16, 1, 80.0, num_failed=2),
            record("ngram", 32, 1, 300.0), record("off", 32, 1, 400.0),
            record("off", 16, 2, 125.0), record("ngram", 16, 2, 100.0)]  # repeat 2 at 32: not run yet
    assert paired_summary(runs, plan) == {
        "16": {"tokens_per_s": {"off": {"per_repeat": [100.0, 80.0, 125.0], "num_failed_requests": 2,
                                        "median": 100.0, "min": 80.0, "max": 125.0},
                                "ngram": {"per_repeat": [75.0, 104.0, 100.0], "num_failed_requests": 0,
                                          "median": 100.0, "min": 75.0, "max": 104.0}},
               "ratio_to_baseline": {"ngram": {"per_repeat": [0.75, 1.3, 0.8], "median": 0.8, "min": 0.75}}},
        "32": {"tokens_per_s": {"off": {"per_repeat": [200.0, 400.0, None], "num_failed_requests": 0,
                                        "median": 300.0, "min": 200.0, "max": 400.0},
                                "ngram": {"per_repeat": [250.0, 300.0, None], "num_failed_requests": 0,
                                          "median": 275.0, "min": 250.0, "max": 300.0}},
               "ratio_to_baseline": {"ngram": {"per_repeat": [1.25, 0.75, None], "median": 1.0, "min": 0.75}}},
    }


def test_no_baseline_no_ratios_and_nothing_run_yet():
    plan = ComparePlan((NGRAM,), (2,), repeats=2, baseline=None)
    assert paired_summary([], plan) == {"2": {
        "tokens_per_s": {"ngram": {"per_repeat": [None, None], "num_failed_requests": 0,
                                   "median": None, "min": None, "max": None}},
        "ratio_to_baseline": {}}}


def test_kept_metrics():
    text = "\n".join([
        "# HELP specserve_generation_tokens_total Generated tokens.",
        "specserve_generation_tokens_total 96.0",
        "specserve_generation_tokens_created 1.7e+09",
        'specserve_engine_step_seconds_count{kind="plain"} 12.0',
        'specserve_spec_decode_accepted_tokens_per_depth_total{depth="1"} 5.0',
        "specserve_kv_cache_usage 0.25",
        "specserve_prompt_tokens_total 40.0"])
    assert kept_metrics(text) == {"specserve_generation_tokens_total": 96.0,
                                  'specserve_engine_step_seconds_count{kind="plain"}': 12.0,
                                  'specserve_spec_decode_accepted_tokens_per_depth_total{depth="1"}': 5.0}


def test_arguments_become_a_plan_and_a_workload():
    args, plan = serve_compare.parse_args(
        ["--spec", "off=off", "--spec", 'tree8={"method": "ngram", "max_tree_tokens": 8}', "--concurrency", "16,32",
         "--prompt-set", "humaneval", "--prompt-set", "chat", "--num-prompts", "256", "--stop-at-eos"])
    assert plan == ComparePlan((OFF, Spec("tree8", '{"method": "ngram", "max_tree_tokens": 8}')), (16, 32))
    assert serve_compare.bench_argv(args, "http://127.0.0.1:8100", 16) == [
        "--base-url", "http://127.0.0.1:8100", "--max-concurrency", "16", "--num-prompts", "256", "--max-tokens",
        "128", "--request-rate", "inf", "--burstiness", "1.0", "--seed", "0", "--spec-stats", "--no-progress",
        "--prompt-set", "humaneval", "--prompt-set", "chat", "--stop-at-eos"]


@pytest.mark.parametrize("argv, message", [
    (["--spec", "ngram"], "bad --spec 'ngram': write NAME=CONFIG"),
    (["--spec", "=off"], "bad --spec '=off'"),
    (["--spec", "a b=off"], "bad --spec 'a b=off'"),
    (["--spec", "x=medusa"], "bad --spec x: speculative method must be one of"),
    (["--spec", "x={bad"], "bad --spec x: --speculative-config is not valid JSON"),
    (["--spec", "off=off", "--spec", "off=ngram"], "--spec names must differ"),
    ([], "give at least one --spec"),
    (["--spec", "off=off", "--repeats", "0"], "--repeats must be at least 1, not 0"),
    (["--spec", "off=off", "--concurrency", "16,0"], "at least 1"),
    (["--spec", "off=off", "--concurrency", "16,16"], "lists a count twice"),
    (["--spec", "off=off", "--concurrency", "many"], "bad --concurrency"),
    (["--spec", "base=off", "--spec", "ngram=ngram"], "the baseline 'off' is not a --spec name (base, ngram)"),
    (["--spec", "a=off", "--baseline", "b"], "the baseline 'b' is not a --spec name (a)"),
    (["--spec", "off=off", "--server-args", "--device cpu --port 9000"], "must not set --port"),
    (["--spec", "off=off", "--server-args=--speculative-config=ngram"], "must not set --speculative-config=ngram"),
    (["--spec", "off=off", "--request-rate", "1,2"], "takes one rate here"),
    (["--spec", "off=off", "--request-rate", "0"], "positive rates"),
    (["--spec", "off=off", "--repeats", "2", "--concurrency", "16,32", "--port-base", "65533"],
     "--port-base 65533 gives ports up to 65536"),  # 4 runs: 65533 .. 65536
    (["--spec", "off=off", "--port-base", "80"], "use one in 1024..65535"),
    (["--spec", "off=off", "--server-args", "--host 0.0.0.0"], "must not set --host"),
])
def test_user_mistakes_are_one_sentence(argv, message, capsys):
    with pytest.raises(SystemExit):
        serve_compare.parse_args(argv)
    assert message in capsys.readouterr().err


def test_baseline_none_compares_without_off():
    _, plan = serve_compare.parse_args(["--spec", "a=ngram", "--spec", "b=off", "--baseline", "none"])
    assert plan.baseline is None and plan.spec_names == ("a", "b")


def test_a_server_that_cannot_start_is_explained(tmp_path):
    argv = ["--spec", "off=off", "--concurrency", "1", "--repeats", "1", "--port-base", str(free_port()),
            "--server-args", f"--device cpu --model {tmp_path / 'missing.gguf'}", "--log-dir", str(tmp_path),
            "--out", str(tmp_path / "out.json"), "--startup-timeout", "60"]
    with pytest.raises(SystemExit, match=r"(?s)the server exited with status 2 before it was ready.*missing\.gguf' does not exist"):
        serve_compare.main(argv)
    assert not (tmp_path / "out.json").exists()


def free_port_pair() -> int:
    """A port p with p + 1 also free now (the comparison's two runs take both)."""
    while True:
        port = free_port()
        if port < 65535:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    pass


@pytest.mark.slow
def test_a_real_comparison_on_the_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the servers inherit it: see tests/server/conftest.py
    out = tmp_path / "compare.json"
    result = serve_compare.main(
        ["--spec", "off=off", "--spec", "ngram=ngram", "--concurrency", "2", "--repeats", "1", "--num-prompts", "2",
         "--max-tokens", "4", "--port-base", str(free_port_pair()), "--server-args", "--device cpu --dtype float32",
         "--log-dir", str(tmp_path / "logs"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["complete"] and result["environment"]["device"].startswith("cpu")
    assert [(r["spec"], r["order_index"], r["num_completed"], r["num_failed"], r["num_output_tokens"],
             r["max_in_flight"], r["server"]["exit_code"]) for r in result["runs"]] == [
        ("off", 0, 2, 0, 8, 2, 0), ("ngram", 1, 2, 0, 8, 2, 0)]
    off, ngram = result["runs"]
    port = result["config"]["port_base"]
    assert off["server"]["command"].endswith(f" serve --port {port} --speculative-config off --device cpu --dtype float32")
    assert off["metrics"]["specserve_spec_decode_draft_tokens_total"] == 0.0
    assert ngram["metrics"]["specserve_spec_decode_draft_tokens_total"] > 0 and ngram["mean_accepted_length"] >= 1.0
    assert off["metrics"]["specserve_generation_tokens_total"] == 8 + 16  # and the 16-token warm-up request
    ratio = result["summary"]["2"]["ratio_to_baseline"]["ngram"]
    assert ratio["per_repeat"] == [ngram["output_throughput"] / off["output_throughput"]] == [ratio["median"]]
    assert len(list((tmp_path / "logs").iterdir())) == 2
    table = capsys.readouterr().out
    assert "[2/2] repeat 0 c2 ngram:" in table and f"-> {out}" in table
