"""Where a decode step's time goes, engine by engine: the same request through speculation off
and through engines with drafters: its drafting disabled, switched off (the engine's record of
its drafters losing, as in a workload that defeats them) and enabled.

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
from dataclasses import replace
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
from specserve.engine.batch_gate import MIN_BATCH, MIN_SAMPLES
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.switch_off import PRIOR_HISTORY, AcceptancePrior, DraftStep
from specserve.errors import SpecserveError
from specserve.models.loader import load_model

TOP_OPS = 12


MODES = {  # mode -> (speculation enabled for the request, engine record losing, batch gate closed)
    "no drafting": (False, False, False),
    "switched off": (True, True, False),
    "gate closed": (True, False, True),
    "drafting": (True, False, False),
}


def close_gate(engine: LLMEngine, num_seqs: int) -> None:
    """Record drafting as losing at this batch size, so the gate keeps steps plain (but for its
    drafting probes, one step in ``interval``)."""
    engine.gate.rates.clear()
    for _ in range(MIN_SAMPLES):
        engine.gate.record(num_seqs, 3.0 * num_seqs, num_seqs, True)
        engine.gate.record(num_seqs, 1.0 * num_seqs, num_seqs, False)


def lose_engine_record(engine: LLMEngine) -> None:
    """Fill the engine-wide record with drafting steps that accepted nothing, so a new request
    starts switched off (it probes in its first step, then drafts no more for 128 steps)."""
    prior = engine.acceptance_priors.setdefault(engine.resolve_speculation(None).drafters, AcceptancePrior())
    for _ in range(PRIOR_HISTORY):
        prior.add(DraftStep(engine.config.speculative.max_tree_tokens, 0, 0, 0.0))


def run_request(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, mode: str) -> tuple[list[float], int]:
    """Seconds of every decode step of the prompts' requests, run together (the prefill step left
    out), and how many of those steps the first request ran switched off (the engine's record of
    its drafters is reset first)."""
    enabled, losing, gated = MODES[mode]
    engine.acceptance_priors.clear()
    if losing:
        lose_engine_record(engine)
    if gated:
        close_gate(engine, len(prompts))
    for prompt in prompts:
        engine.add_request(prompt, params, speculation=SpeculationParams(enabled=enabled))
    engine.step()  # the prefill
    times, switched_off = [], 0
    while engine.has_unfinished():
        sync()
        start = time.perf_counter()
        outputs = engine.step()
        sync()
        times.append(time.perf_counter() - start)
        if outputs:
            switched_off = outputs[0].num_switched_off_steps
    return times, switched_off


def profile_mode(engine: LLMEngine, prompt: list[list[int]], params: SamplingParams, mode: str,
                 profile_tokens: int, cprofile: bool = False) -> dict[str, Any]:
    """Step times from one request of ``params.max_tokens``; operators from a profiled request of
    ``profile_tokens`` (the profiler's post-processing takes minutes for thousands of CUDA steps)."""
    run_request(engine, prompt, params, mode)  # warm-up
    times, switched_off = run_request(engine, prompt, params, mode)
    params = replace(params, max_tokens=min(params.max_tokens, profile_tokens))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    python_top = None
    if cprofile:  # the host's Python, function by function (torch.profiler sees operators only)
        import cProfile
        import pstats

        host = cProfile.Profile()
        host.enable()
        run_request(engine, prompt, params, mode)
        host.disable()
        stats = pstats.Stats(host).stats
        python_top = sorted(((f"{path}:{line}({name})", calls, 1e3 * own, 1e3 * cumulative)
                             for (path, line, name), (calls, _, own, cumulative, _) in stats.items()),
                            key=lambda row: -row[2])[:25]
    with profile(activities=activities) as prof:
        profiled, _ = run_request(engine, prompt, params, mode)
    num_steps = len(profiled)
    events = prof.key_averages()
    ops = {e.key: (e.count / num_steps, e.self_cpu_time_total / num_steps / 1e3) for e in events}
    kernels = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    num_kernels = sum(e.count for e in kernels)
    device_ms = sum(getattr(e, "self_device_time_total", 0.0) for e in kernels) / num_steps / 1e3
    return {
        "median_step_ms": 1e3 * statistics.median(times),
        "mean_step_ms": 1e3 * statistics.mean(times),
        "num_steps": len(times),
        "switched_off_steps": switched_off,
        "ops_per_step": sum(count for count, _ in ops.values()),
        "cuda_kernels_per_step": num_kernels / num_steps,
        "cuda_kernel_ms_per_step": device_ms,
        "ops": {key: {"per_step": round(count, 2), "self_cpu_ms_per_step": round(ms, 4)} for key, (count, ms) in ops.items()},
        "python_top_by_own_ms": python_top,  # (function, calls, own ms, cumulative ms) over one request
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
    parser.add_argument("--batch-size", type=int, default=1, help="requests run together (the set's first prompts)")
    parser.add_argument("--profile-tokens", type=int, default=17, help="tokens of the profiled request")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--kv-cache-memory", type=float, default=1.0)
    parser.add_argument("--cprofile", action="store_true", help="also cProfile one request (drafting and no-drafting modes)")
    parser.add_argument("--offload", action="store_true", help="every layer streamed from host memory (specserve --offload)")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=ModelConfig.enforce_eager,
                        help="--no-enforce-eager: steps replayed as CUDA graphs (on CUDA)")
    parser.add_argument("--out", default=None, help="JSON file (default: bench/results/step_profile_<device>.json)")
    args = parser.parse_args(argv)
    try:
        specs = {"off": SpeculativeConfig()}
        for item in args.spec:
            name, sep, config = item.partition("=")
            if not sep or not name:
                raise ValueError(f"--spec takes NAME=CONFIG, not {item!r}")
            specs[name] = SpeculativeConfig.parse(config)
        if args.max_tokens < 2 or args.profile_tokens < 2:
            raise ValueError("--max-tokens and --profile-tokens must be at least 2 (one prefill, one decode step)")
        if args.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        prompt_set = load_prompt_set(args.prompt_set, args.batch_size)
    except (ValueError, SpecserveError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_config = ModelConfig(device=args.device, enforce_eager=args.enforce_eager, offload=args.offload)
    loaded = load_model(model_config)
    prompt = [prompt_token_ids(loaded.tokenizer, p, prompt_set.chat_template) for p in prompt_set.prompts]
    prompt = (prompt * args.batch_size)[: args.batch_size]  # a set smaller than the batch repeats
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True)
    results: dict[str, Any] = {}
    for name, spec in specs.items():
        engine = LLMEngine(EngineConfig(model=model_config, cache=CacheConfig(kv_cache_memory_gb=args.kv_cache_memory),
                                        speculative=spec), loaded=loaded)
        modes = ["no drafting"] if not spec.enabled else list(MODES)
        if not (spec.enabled and spec.switch_off and engine.step_cost is not None):
            modes = [m for m in modes if m != "switched off"]
        if engine.gate is None or args.batch_size < MIN_BATCH:
            modes = [m for m in modes if m != "gate closed"]
        results[name] = {mode: profile_mode(engine, prompt, params, mode, args.profile_tokens,
                                            args.cprofile and mode in ("drafting", "no drafting"))
                         for mode in modes}
        del engine
    reference = results["off"]["no drafting"]
    print(f"{'engine':<16}{'mode':<13}{'step ms (median)':>18}{'ops/step':>10}{'kernels/step':>14}{'kernel ms':>11}")
    for name, modes in results.items():
        for mode, figures in modes.items():
            print(f"{name:<16}{mode:<13}{figures['median_step_ms']:>18.2f}{figures['ops_per_step']:>10.0f}"
                  f"{figures['cuda_kernels_per_step']:>14.0f}{figures['cuda_kernel_ms_per_step']:>11.3f}")
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
