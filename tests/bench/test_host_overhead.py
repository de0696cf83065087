"""bench.host_overhead on the tiny random model: the per-kind step table, the saved profile, the
stubbed forward and the propose timing, and its one-sentence errors."""

import json
from types import SimpleNamespace

import pytest
import torch

from bench import host_overhead
from specserve.config import CacheConfig, EngineConfig, ModelConfig, SpeculativeConfig
from specserve.engine.llm_engine import LLMEngine

SMALL = ["--rounds", "1", "--num-requests", "8", "--batch-size", "4", "--max-tokens", "16", "--device", "cpu"]
# The off engine on SMALL: requests of 8, 12, 16, 20, 8, 12, 16, 20 tokens, 4 in flight, one token
# a step. Prefill steps 1 (the first four), 9 (the 8 after the first 8), 13 (the 12 after the 12),
# 17 (the 16 and 20 after the 8 and 16 that ended at step 16); the last request ends at step 36;
# 4 in flight through step 20, so plain steps of a full batch are 20 - 4.
OFF_STEPS = {"plain": 32, "drafting": 0, "prefill": 4, "all": 36, "plain full": 16}
KEYS = {"benchmark", "config", "environment", "model", "results", "propose_plain_us", "cprofile_own_per_step"}


def step_counts(kinds: dict) -> dict:
    return {kind: figures["steps_per_round"] for kind, figures in kinds.items()}


def test_tiny_run_counts_steps_by_kind_and_saves_the_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "ho.json"
    assert host_overhead.main([*SMALL, "--cprofile", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved) == KEYS and saved["model"] == "tiny-random-2x64"
    results = saved["results"]
    assert set(results) == {"off", "ngram"}
    assert step_counts(results["off"]) == OFF_STEPS
    counts = step_counts(results["ngram"])
    assert counts["all"] == counts["plain"] + counts["drafting"] + counts["prefill"]
    assert counts["drafting"] > 0  # under 8 in flight the gate never closes
    assert saved["propose_plain_us"] is None  # not asked for: no propose line either
    rows = saved["cprofile_own_per_step"]
    assert 0 < len(rows) <= 25 and set(rows[0]) == {"function", "calls", "ms"}
    assert [abs(r["ms"]) for r in rows] == sorted((abs(r["ms"]) for r in rows), reverse=True)
    out_text = capsys.readouterr().out
    assert out_text.startswith("tiny-random-2x64 on cpu, 8 requests, 4 in flight, 1 rounds;")
    assert "propose, " not in out_text  # (cProfile rows may name propose functions)


def test_stubbed_forward_and_propose_timing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "ho.json"
    assert host_overhead.main([*SMALL, "--stub-forward", "--propose-calls", "5", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved) == KEYS and saved["cprofile_own_per_step"] is None
    assert (saved["config"]["stub_forward"], saved["config"]["propose_calls"]) == (True, 5)
    assert step_counts(saved["results"]["off"]) == OFF_STEPS  # the stub changes no step of the off engine
    propose_us = saved["propose_plain_us"]
    assert set(propose_us) == {"off", "ngram"} and all(us > 0 for us in propose_us.values())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiny-random-2x64 on cpu, forward stubbed, 8 requests, 4 in flight, 1 rounds;")
    assert lines[1].split() == ["engine", "steps", "n/round", "draft", "verify", "other", "loop", "host"]
    rows = [(line[:12].strip(), line[12:22].strip(), int(line[22:30])) for line in lines[2:] if line.startswith("off ")]
    # no drafting row for off: the table leaves out kinds without steps
    assert rows == [("off", "plain", 32), ("off", "prefill", 4), ("off", "all", 36), ("off", "plain full", 16)]
    propose_line = next(line for line in lines if line.startswith("propose"))
    assert propose_line.startswith("propose, 4 sequences, plain step (us per call, min of 7 x 5 calls): off ")
    assert ", ngram " in propose_line


def test_stub_forward_gives_fixed_logits_by_row():
    run = host_overhead.stub_forward(vocab_size=4000, device=torch.device("cpu"))
    logits, hidden = run([], [3, 4, 5], return_hidden=False)
    assert hidden is None and logits.shape == (3, 4000) and logits.dtype == torch.float32
    assert logits.argmax(dim=-1).tolist() == [300, 300 + 7919 % 3000, 300 + 2 * 7919 % 3000]
    assert logits.sum().item() == 3.0
    assert torch.equal(run([], [0, 1, 2])[0], logits)  # the same tokens every call


def test_time_propose_leaves_no_request_behind():
    loaded = host_overhead.tiny_model(ModelConfig(device="cpu"))
    engine = LLMEngine(EngineConfig(cache=CacheConfig(kv_cache_memory_gb=0.1),
                                    speculative=SpeculativeConfig.parse("ngram")), loaded=loaded)
    us = host_overhead.time_propose(engine, [[1, 2, 3], [4, 5]], batch_size=3, max_tokens=8, calls=2)
    assert us > 0 and not engine.has_unfinished() and not engine.scheduler.waiting


def test_stub_refuses_drafters_that_read_hidden_states():
    engine = SimpleNamespace(drafter=SimpleNamespace(needs_target_states=True))
    with pytest.raises(ValueError, match=r"^--stub-forward returns no hidden states, and the drafters of 'eagle' read them$"):
        host_overhead.stub_engine(engine, "eagle")


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size, --num-requests, --max-tokens and --rounds must be positive"),
    (["--rounds", "-1"], "--batch-size, --num-requests, --max-tokens and --rounds must be positive"),
    (["--propose-calls", "-1"], "--propose-calls must be 0 (not timed) or more"),
])
def test_bad_sizes_are_one_sentence(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        host_overhead.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f" error: {message}")  # after the usage line
