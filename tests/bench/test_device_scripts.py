"""bench/device/*.sh, the GPU session's calls, run here with stand-ins for python3, timeout and
nvidia-smi: every command they would run is recorded, then each ``python3 -m bench.X`` line's
arguments go through that module's own argument parser and each --method / --spec through the
speculative-config parser, so a typo fails here instead of costing device minutes."""

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.acceptance import parse_methods

ROOT = Path(__file__).resolve().parents[2]
DEVICE = ROOT / "bench" / "device"
WEIGHTS = ROOT / "draft_models" / "weights"


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def _parse_only(module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """``argv`` through ``module``'s own parser (and the checks it makes right after), stopped
    before anything loads a model."""
    mod = importlib.import_module(module)
    try:
        if hasattr(mod, "parse_args"):  # bench.latency, bench.serve_compare: parse and check, load nothing
            result = mod.parse_args(argv)
            return result[0] if isinstance(result, tuple) else result
        original = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, args=None, namespace=None):
            raise _Parsed(original(self, args, namespace))

        with monkeypatch.context() as patch:  # the rest parse inside main(): stop it there
            patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
            mod.main(argv)
    except _Parsed as stop:
        return stop.namespace
    except SystemExit as exc:
        raise AssertionError(f"{module} refused {argv}: exit {exc.code}") from None
    raise AssertionError(f"{module}: no parser ran")


def _run_calls(tmp_path: Path) -> list[list[str]]:
    """Runs call1.sh to call4.sh in a scratch tree; returns every python3 argv."""
    work = tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    shutil.copytree(DEVICE, work / "bench" / "device")
    for half, name in (("a", "part_aa"), ("b", "part_ab")):
        (work / ".devcarry" / half).mkdir(parents=True)
        (work / ".devcarry" / half / name).write_bytes(b"half " + half.encode())
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "python3.jsonl"
    (fake / "python3").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                                  "with open(os.environ['FAKE_LOG'], 'a') as f:\n"
                                  "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
                                  "sys.exit(1 if sys.argv[1:3] == ['-m', 'pytest'] else 0)\n")  # tests fail
    (fake / "timeout").write_text("#!/bin/sh\nshift\nexec \"$@\"\n")
    (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE_LOG": str(log), "OUT": str(out),
           "DEVICE_CACHE": str(tmp_path / "cache"), "DEVICE_DRAFTS": str(tmp_path / "drafts")}
    for script in ("call1.sh", "call2.sh", "call3.sh", "call4.sh"):
        done = subprocess.run(["bash", f"bench/device/{script}", "t"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (script, done.stdout, done.stderr)
    calls = log.read_text().splitlines()
    done = subprocess.run(["bash", "bench/device/call1.sh", "t", "stage"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)  # redoing call 1 on a cold machine
    assert done.returncode == 0 and (tmp_path / "cache" / "part_aa").exists()
    assert len(log.read_text().splitlines()) == len(calls)  # "stage" ran no python3
    # a failed step (here the GPU tests) ends no call early: call 2's acceptance still ran
    assert (out / "acceptance_t_chat.log").exists() and (out / "acceptance_t_humaneval.log").exists()
    model = tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.read_bytes() == b"half ahalf b"  # env.sh joined call 1's half and call 2's
    return [json.loads(line) for line in calls]


def test_every_command_of_the_device_calls_parses(tmp_path, monkeypatch):
    argvs = _run_calls(tmp_path)
    modules = [a[1] for a in argvs if a[:1] == ["-m"] and a[1].split(".")[0] in ("bench", "draft_models")]
    assert sorted(modules) == sorted(["bench.big_shape", "bench.step_buckets", "bench.latency", "bench.acceptance",
                                      "bench.acceptance", "bench.serve_compare", "draft_models.train"])
    drafts = tmp_path / "drafts"
    for argv in argvs:
        if argv[:2] == ["-m", "pytest"]:
            assert all((ROOT / p).exists() for p in argv[2:] if p.startswith("tests/"))
        if argv[:1] != ["-m"] or argv[1] not in modules:
            continue
        args = _parse_only(argv[1], argv[2:], monkeypatch)
        if argv[1] == "bench.acceptance":
            text = json.dumps(args.method).replace(str(drafts), str(WEIGHTS))
            methods = parse_methods(json.loads(text))  # the drafts' folders as the calls name them
            assert list(methods) == ["ngram", "feat11", "f11_tok9_ngram_or", "f11_ngram", "f11_tok9_or"]
            assert all(m.max_tree_tokens == 64 for m in methods.values())  # #4's budget
            assert args.max_tokens == 256 and args.num_prompts is None  # every prompt, 256 tokens
        if argv[1] == "draft_models.train":
            assert args.feature and args.init_draft == str(drafts / "smollm2-token9-1")
            assert args.boost_against == [str(drafts / "smollm2-feature11-1"), str(drafts / "smollm2-token9-1")]
            assert args.gen_budget_min < args.time_budget_min <= 9.5  # within one call
        if argv[1] == "bench.latency":
            assert args.max_tokens == 256 and args.temperature == 0 and args.methods == "off,ngram,hf"


def test_env_sh_says_so_when_call_one_is_gone(tmp_path):
    work = tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    shutil.copytree(DEVICE, work / "bench" / "device")
    env = {**os.environ, "DEVICE_CACHE": str(tmp_path / "cache"), "DEVICE_DRAFTS": str(tmp_path / "drafts")}
    done = subprocess.run(["bash", "-c", "source bench/device/env.sh"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "redo call 1" in done.stderr
