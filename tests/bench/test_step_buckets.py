"""bench.step_buckets on the CPU: cases parse, every case runs through the engine's runner with
its prompts and decoding sequences (no graph buckets on a CPU)."""

import json

import pytest

from bench import step_buckets
from bench.step_buckets import Case


def test_cases_parse_and_count_their_tokens():
    assert Case.parse("31x1+3x113") == Case(31, 1, 3, 113)
    assert Case.parse("31x1+3x113").num_tokens == 31 + 339 and Case.parse("16x8").name == "16x8"
    for bad in ("32", "0x1", "2x0", "2x1+3x0", "ax1"):
        with pytest.raises(ValueError, match="bad case"):
            Case.parse(bad)


def test_a_cpu_run_times_every_case(tmp_path, capsys):
    out = tmp_path / "buckets.json"
    assert step_buckets.main(["--device", "cpu", "--repeats", "1", "--kv-cache-memory", "0.1", "--context", "20",
                              "--case", "2x3", "--case", "1x1+2x5", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["case"], r["tokens"], r["sequences"]) for r in results] == [("2x3", 6, 2), ("1x1+2x5", 11, 3)]
    assert all(r["bucket"] is None and r["eager"] is False and r["ms"] > 0 for r in results)  # no graphs on a CPU
    assert "1x1+2x5" in capsys.readouterr().out


def test_cases_beyond_max_num_seqs_are_refused_before_loading(capsys):
    with pytest.raises(SystemExit):
        step_buckets.main(["--device", "cpu", "--max-num-seqs", "2", "--case", "2x1+1x4"])
    assert "more sequences than --max-num-seqs" in capsys.readouterr().err


def test_the_random_shape_is_the_default_models():
    from dataclasses import replace

    from specserve.config import ModelConfig
    from specserve.models.loader import load_model

    arch = load_model(ModelConfig(device="cpu")).arch
    assert replace(arch, bos_token_id=None, eos_token_ids=(), rms_norm_eps=1e-5) == step_buckets.SMOLLM2_135M  # eps: float32 in the GGUF
