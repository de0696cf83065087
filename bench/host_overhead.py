"""Host work per engine step, phase by phase: speculation off against a drafting engine whose
batch gate keeps its steps plain, in one run. A plain step of the drafting engine should cost
the host what a step of the off engine costs.

    python -m bench.host_overhead                               # tiny random model, CPU or GPU
    python -m bench.host_overhead --model default --device cuda # the default model

Each round, every engine serves ``--num-requests`` chat prompts, ``--batch-size`` at a time, as
the server's engine thread does (admit between steps, step, record ``/metrics``); requests ask
for 1/2, 3/4, 1 and 5/4 of ``--max-tokens`` greedy tokens in turn, so they finish apart and new
ones join a running batch. The drafting engine's gate is closed first
(``bench.step_profile.close_gate``): plain steps but for its drafting probes. Engines alternate
within a round; the first round is a warm-up. Per step, from the engine's ``StepStats`` and as
``/metrics`` splits them:

- draft: proposing trees; verify: the target forward, verification and read-back;
- other: the rest of the step (scheduling, accepting, committing, detokenizing, outputs);
- loop: the engine thread's work before the step (admitting requests) and after it
  (``ServerMetrics.record_step`` and ``record_outputs``).

Rows: plain decode steps (no prompt chunk, no draft), "plain full" (those with ``--batch-size``
sequences: the same work in both engines), drafting probes, prefill steps and all steps (what
the ``/metrics`` counters divide into); each figure is the median over rounds of the round's
mean (the machine's load moves single rounds). ``--model tiny`` (the default) is a 2-layer Llama
shape with RANDOM weights and the default model's tokenizer, so the host's work dominates.
``--cprofile``: also the functions whose own time per step (all kinds) differs most from off.

``--stub-forward``: the target's forward replaced by a stub returning fixed logits (``stub_forward``),
so the verify phase holds no model work and only the host's work is timed (drafters that read the
target's hidden states cannot run on it). ``--propose-calls N``: also ``propose`` on a plain step of
``--batch-size`` sequences (every one with one slot: no draft requested), per engine, the minimum
over 7 timings of N calls, in microseconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import torch

from bench.common import environment, save_json, sync
from bench.prompt_sets import load_prompt_set, prompt_token_ids
from bench.step_profile import close_gate
from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.speculative import propose
from specserve.models.config import LlamaArchConfig
from specserve.models.loader import (
    LoadedModel,
    load_model,
    load_model_tokenizer,
    random_model,
    resolve_device,
    resolve_dtype,
)
from specserve.server.metrics import ServerMetrics

PHASES = ("draft", "verify", "other", "loop")
PROPOSE_REPEATS = 7  # timings of --propose-calls calls each; the minimum is reported


def tiny_model(config: ModelConfig) -> LoadedModel:
    """A 2-layer, 64-wide Llama shape with RANDOM weights and the default model's tokenizer."""
    tokenizer = load_model_tokenizer(config.model)
    eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    arch = LlamaArchConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
                           eos_token_ids=eos)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    return LoadedModel(model=random_model(arch, device, dtype), tokenizer=tokenizer, arch=arch,
                       name="tiny-random-2x64", device=device, dtype=dtype, max_model_len=2048,
                       eos_token_ids=eos)


def stub_forward(vocab_size: int, device: torch.device) -> Callable[..., tuple[torch.Tensor, None]]:
    """A ``ModelRunner.run`` stand-in: logits [len(rows), vocab] float32 on ``device``, zero but for
    a 1 at a token that varies by row (the same tokens every call), and no hidden states."""
    def run(items, rows, return_hidden=False, features=None, input_ids=None):
        index = torch.arange(len(rows), device=device)
        logits = torch.zeros(len(rows), vocab_size, device=device)
        logits[index, (index * 7919 % 3000 + 300) % vocab_size] = 1.0
        return logits, None
    return run


def stub_engine(engine: LLMEngine, name: str) -> None:
    """Replace the engine's target forward by ``stub_forward``; ValueError if its drafters read
    the target's hidden states (the stub has none)."""
    if engine.drafter is not None and engine.drafter.needs_target_states:
        raise ValueError(f"--stub-forward returns no hidden states, and the drafters of {name!r} read them")
    engine.runner.run = stub_forward(engine.loaded.arch.vocab_size, engine.loaded.device)


def time_propose(engine: LLMEngine, prompts: list[list[int]], batch_size: int, max_tokens: int,
                 calls: int) -> float:
    """Microseconds per ``propose`` call on a plain step of ``batch_size`` new requests (every
    sequence with one slot: no draft requested), the minimum over ``PROPOSE_REPEATS`` timings of
    ``calls`` calls; the requests are aborted after."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(prompts[i % len(prompts)], params) for i in range(batch_size)]
    seqs, slots = [engine.sequences[i] for i in ids], [1] * batch_size
    try:
        seconds = min(timeit.repeat(lambda: propose(engine.drafter, seqs, slots), number=calls, repeat=PROPOSE_REPEATS))
    finally:
        for request_id in ids:
            engine.abort(request_id)
    return 1e6 * seconds / calls


def request_lengths(num_requests: int, max_tokens: int) -> list[int]:
    """max_tokens of each request: 1/2, 3/4, 1 and 5/4 of ``max_tokens`` in turn (requests
    finish at different steps, so new ones join a running batch, as in serving)."""
    return [max(1, (2 + i % 4) * max_tokens // 4) for i in range(num_requests)]


def run_round(engine: LLMEngine, prompts: list[list[int]], lengths: list[int],
              batch_size: int) -> dict[str, list[dict[str, float]]]:
    """Serve one request per entry of ``lengths`` (prompts in turn), at most ``batch_size`` at a
    time, as the server's engine thread does: admit between steps, step, record metrics. Per
    step kind, every step's seconds per phase (admitting counts as loop, as on the server)."""
    if engine.gate is not None:
        close_gate(engine, batch_size)
    metrics = ServerMetrics()
    steps: dict[str, list[dict[str, float]]] = {"prefill": [], "plain": [], "drafting": []}
    next_request, loop_s = 0, 0.0
    while True:
        loop_start = time.perf_counter()
        while next_request < len(lengths) and len(engine.sequences) < batch_size:
            params = SamplingParams(max_tokens=lengths[next_request], temperature=0.0, ignore_eos=True)
            engine.add_request(prompts[next_request % len(prompts)], params)
            next_request += 1
        loop_s += time.perf_counter() - loop_start
        if not engine.has_unfinished():
            return steps
        sync()
        outputs = engine.step()
        stats = engine.last_step
        loop_start = time.perf_counter()
        metrics.record_step(stats)
        metrics.record_outputs(outputs, loop_start)
        loop_s += time.perf_counter() - loop_start
        steps[stats.kind].append({"draft": stats.draft_s, "verify": stats.verify_s,
                                         "other": stats.total_s - stats.draft_s - stats.verify_s, "loop": loop_s,
                                         "num_seqs": stats.num_seqs})
        loop_s = 0.0


def summarize(rounds: list[dict[str, list[dict[str, float]]]], kinds: tuple[str, ...],
              num_seqs: int | None = None) -> dict[str, Any]:
    """ms per step per phase over the steps of ``kinds`` (of ``num_seqs`` sequences; None: any):
    the median over rounds of each round's mean (rounds without such steps skipped); host =
    draft + other + loop."""
    per_round = [[step for kind in kinds for step in r[kind] if num_seqs in (None, step["num_seqs"])] for r in rounds]
    means = {phase: [1e3 * statistics.fmean(s[phase] for s in steps) for steps in per_round if steps]
             for phase in PHASES}
    summary: dict[str, Any] = {phase: statistics.median(values) if values else None for phase, values in means.items()}
    summary["steps_per_round"] = statistics.median(len(steps) for steps in per_round)
    summary["host"] = None if summary["other"] is None else summary["draft"] + summary["other"] + summary["loop"]
    return summary


KINDS = {"plain": ("plain",), "drafting": ("drafting",), "prefill": ("prefill",),
         "all": ("plain", "drafting", "prefill")}  # "plain full": plain steps of --batch-size sequences


def cprofile_round(engine: LLMEngine, *args: Any) -> tuple[dict[str, tuple[int, float]], int]:
    """Own (calls, seconds) per function over one round, and the round's number of steps."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    steps = run_round(engine, *args)
    profiler.disable()
    own = {f"{path.rsplit('/', 1)[-1]}:{line}({name})": (calls, seconds)
           for (path, line, name), (calls, _, seconds, _, _) in pstats.Stats(profiler).stats.items()}
    return own, sum(len(s) for s in steps.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (random weights), 'default', or a model path")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--spec", default="ngram", help="the drafting engine's --speculative-config")
    parser.add_argument("--batch-size", type=int, default=16, help="requests in flight")
    parser.add_argument("--num-requests", type=int, default=64, help="requests per round")
    parser.add_argument("--max-tokens", type=int, default=128, help="mean tokens per request (x 7/8)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    parser.add_argument("--cprofile", action="store_true", help="also cProfile one round of each engine")
    parser.add_argument("--stub-forward", action="store_true",
                        help="replace the target's forward by fixed logits: time the host's work only")
    parser.add_argument("--propose-calls", type=int, default=0, metavar="N",
                        help="also time propose on a plain step, N calls a timing (default 0: not timed)")
    parser.add_argument("--out", default=None, help="JSON file (default: bench/results/host_overhead_<device>.json)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.num_requests, args.max_tokens, args.rounds) < 1:
        parser.error("--batch-size, --num-requests, --max-tokens and --rounds must be positive")
    if args.propose_calls < 0:
        parser.error("--propose-calls must be 0 (not timed) or more")
    torch.set_num_threads(1)
    model_config = ModelConfig(model=None if args.model in ("tiny", "default") else args.model, device=args.device)
    loaded = tiny_model(model_config) if args.model == "tiny" else load_model(model_config)
    prompt_set = load_prompt_set("chat", args.num_requests)
    prompts = [prompt_token_ids(loaded.tokenizer, p, prompt_set.chat_template) for p in prompt_set.prompts]
    workload = (prompts, request_lengths(args.num_requests, args.max_tokens), args.batch_size)
    engines = {}
    for name, spec in (("off", SpeculativeConfig()), (args.spec, SpeculativeConfig.parse(args.spec))):
        engines[name] = LLMEngine(EngineConfig(model=model_config, cache=CacheConfig(kv_cache_memory_gb=0.5),
                                               speculative=spec), loaded=loaded)
        if args.stub_forward:
            try:
                stub_engine(engines[name], name)
            except ValueError as exc:
                parser.error(str(exc))
    rounds: dict[str, list] = {name: [] for name in engines}
    for index in range(1 + args.rounds):
        for name, engine in engines.items():
            steps = run_round(engine, *workload)
            if index:
                rounds[name].append(steps)
    results = {name: {kind: summarize(r, kinds) for kind, kinds in KINDS.items()} for name, r in rounds.items()}
    for name, r in rounds.items():  # the batch full: a per-step comparison of the same work
        results[name]["plain full"] = summarize(r, ("plain",), args.batch_size)

    forward = ", forward stubbed" if args.stub_forward else ""
    print(f"{loaded.name} on {loaded.device}{forward}, {args.num_requests} requests, {args.batch_size} in flight, "
          f"{args.rounds} rounds; ms per step (median over rounds of the round's mean)")
    print(f"{'engine':<12}{'steps':<10}{'n/round':>8}" + "".join(f"{p:>9}" for p in PHASES) + f"{'host':>9}")
    for name, kinds in results.items():
        for kind, figures in kinds.items():
            if figures["host"] is not None:
                print(f"{name:<12}{kind:<10}{figures['steps_per_round']:>8.0f}"
                      + "".join(f"{figures[p]:>9.3f}" for p in PHASES) + f"{figures['host']:>9.3f}")
    for kind in ("plain full", "all"):
        off, other = results["off"][kind], results[args.spec][kind]
        if off["host"] is not None and other["host"] is not None:
            print(f"{kind} steps, host work (draft + other + loop), {args.spec} - off: "
                  f"{other['host'] - off['host']:+.3f} ms per step")

    propose_us = None  # engine -> us per propose call on a plain step of --batch-size sequences
    if args.propose_calls:
        propose_us = {name: time_propose(engine, prompts, args.batch_size, args.max_tokens, args.propose_calls)
                      for name, engine in engines.items()}
        print(f"propose, {args.batch_size} sequences, plain step (us per call, min of {PROPOSE_REPEATS} x "
              f"{args.propose_calls} calls): " + ", ".join(f"{name} {us:.1f}" for name, us in propose_us.items()))

    profile = None
    if args.cprofile:
        (off_own, off_steps), (spec_own, spec_steps) = (cprofile_round(engine, *workload) for engine in engines.values())
        rows = []
        for key in set(off_own) | set(spec_own):
            a, b = off_own.get(key, (0, 0.0)), spec_own.get(key, (0, 0.0))
            rows.append((key, b[0] / spec_steps - a[0] / off_steps, 1e3 * (b[1] / spec_steps - a[1] / off_steps)))
        print(f"cProfile, own time per step (all kinds), {args.spec} - off, largest first:")
        profile = sorted(rows, key=lambda row: -abs(row[2]))[:25]
        for key, calls, ms in profile:
            print(f"    {key:<60}{calls:+9.1f} calls{ms:+9.4f} ms")

    payload = {"benchmark": "host_overhead", "config": vars(args), "environment": environment(),
               "model": loaded.name, "results": results, "propose_plain_us": propose_us,
               # --cprofile: (function, calls per step, own ms per step), drafting engine minus off
               "cprofile_own_per_step": None if profile is None else [
                   {"function": key, "calls": round(calls, 2), "ms": round(ms, 4)} for key, calls, ms in profile]}
    path = save_json(f"host_overhead_{loaded.device.type}", payload, args.out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
