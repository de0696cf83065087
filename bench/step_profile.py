"""Where a decode step's time goes, engine by engine: the same request through speculation off
and through engines with drafters, with its drafting disabled and enabled.

    python -m bench.step_profile --spec 'draft2={"method": "draft", "draft_model": "smollm2-draft-2"}'
    python -m bench.step_profile --device cpu --max-tokens 8 --spec 'ngram="ngram"'     # smoke run

Built to explain one figure (bench/README.md, "Switch-off on the H200"): an engine with a model
drafter whose requests draft nothing took 27.1 ms per step against 22.7 ms for the off engine.
Per engine and mode it records the median step time, and from ``torch.profiler`` over the
measured steps the operators and CUDA kernels per step and the operators whose self CPU time
per step differs most from the off engine's. Every engine serves one warm-up request first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import environment, save_json, sync
from bench.prompt_sets import load_prompt_set, prompt_token_ids
from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SpeculationParams,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.errors import SpecserveError
from specserve.models.loader import load_model

TOP_OPS = 12


def run_request(engine: LLMEngine, prompt: list[int], params: SamplingParams, drafting: bool) -> list[float]:
    """Seconds of every decode step of one request (the prefill step left out)."""
    policy = SpeculationParams(enabled=drafting)
    engine.add_request(prompt, params, speculation=policy)
    engine.step()  # the prefill
    times = []
    while engine.has_unfinished():
        sync()
        start = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def profile_mode(engine: LLMEngine, prompt: list[int], params: SamplingParams, drafting: bool) -> dict[str, Any]:
    run_request(engine, prompt, params, drafting)  # warm-up
    times = run_request(engine, prompt, params, drafting)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        profiled = run_request(engine, prompt, params, drafting)
    num_steps = len(profiled)
    events = prof.key_averages()
    ops = {e.key: (e.count / num_steps, e.self_cpu_time_total / num_steps / 1e3) for e in events}
    num_kernels = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    return {
        "median_step_ms": 1e3 * statistics.median(times),
        "mean_step_ms": 1e3 * statistics.mean(times),
        "num_steps": len(times),
        "ops_per_step": sum(count for count, _ in ops.values()),
        "cuda_kernels_per_step": num_kernels / num_steps,
        "ops": {key: {"per_step": round(count, 2), "self_cpu_ms_per_step": round(ms, 4)} for key, (count, ms) in ops.items()},
    }


def differences(reference: dict[str, Any], other: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(operator, extra calls per step, extra self-CPU ms per step) against ``reference``, largest first."""
    keys = set(reference["ops"]) | set(other["ops"])

    def get(ops: dict, key: str, field: str) -> float:
        return ops.get(key, {}).get(field, 0.0)

    rows = [(key, get(other["ops"], key, "per_step") - get(reference["ops"], key, "per_step"),
             get(other["ops"], key, "self_cpu_ms_per_step") - get(reference["ops"], key, "self_cpu_ms_per_step"))
            for key in keys]
    return sorted(rows, key=lambda row: -abs(row[2]))[:TOP_OPS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", action="append", default=[], metavar="NAME=CONFIG",
                        help="an engine with this --speculative-config (JSON or a method name)")
    parser.add_argument("--prompt-set", default="alphabet:128")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--kv-cache-memory", type=float, default=1.0)
    parser.add_argument("--out", default=None, help="JSON file (default: bench/results/step_profile_<device>.json)")
    args = parser.parse_args(argv)
    try:
        specs = {"off": SpeculativeConfig()}
        for item in args.spec:
            name, sep, config = item.partition("=")
            if not sep or not name:
                raise ValueError(f"--spec takes NAME=CONFIG, not {item!r}")
            specs[name] = SpeculativeConfig.parse(config)
        if args.max_tokens < 2:
            raise ValueError("--max-tokens must be at least 2 (one prefill, one decode step)")
        prompt_set = load_prompt_set(args.prompt_set, 1)
    except (ValueError, SpecserveError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_config = ModelConfig(device=args.device)
    loaded = load_model(model_config)
    prompt = prompt_token_ids(loaded.tokenizer, prompt_set.prompts[0], prompt_set.chat_template)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True)
    results: dict[str, Any] = {}
    for name, spec in specs.items():
        engine = LLMEngine(EngineConfig(model=model_config, cache=CacheConfig(kv_cache_memory_gb=args.kv_cache_memory),
                                        speculative=spec), loaded=loaded)
        modes = {"no drafting": False} if not spec.enabled else {"no drafting": False, "drafting": True}
        results[name] = {mode: profile_mode(engine, prompt, params, drafting) for mode, drafting in modes.items()}
        del engine
    reference = results["off"]["no drafting"]
    print(f"{'engine':<16}{'mode':<13}{'step ms (median)':>18}{'ops/step':>10}{'kernels/step':>14}")
    for name, modes in results.items():
        for mode, figures in modes.items():
            print(f"{name:<16}{mode:<13}{figures['median_step_ms']:>18.2f}{figures['ops_per_step']:>10.0f}"
                  f"{figures['cuda_kernels_per_step']:>14.0f}")
            if name != "off":
                figures["largest_differences_from_off"] = differences(reference, figures)
                for key, calls, ms in figures["largest_differences_from_off"][:5]:
                    print(f"    {key:<48} {calls:+8.1f} calls/step {ms:+9.3f} ms/step")
    payload = {"benchmark": "step_profile", "config": vars(args), "environment": environment(),
               "prompt_set": prompt_set.name, "results": results}
    device = "gpu" if loaded.device.type == "cuda" else "cpu"
    path = save_json(f"step_profile_{device}", payload, args.out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
