"""Where an offloaded decode step's time goes: host phases per step, and on CUDA a timeline of
the copy and compute streams over a few steady steps.

    python -m bench.offload_steps --num-buffers 9 --spec '{"method":"ngram","max_tree_tokens":256,"max_depth":32,"widths":[16]}'
    python -m bench.offload_steps --max-tokens 8 --num-prompts 2 --prompt-set chat   # CPU smoke run (no timeline)

SmolLM2 fully offloaded (``--num-buffers`` working buffers, B - 1 layers prefetched across
passes), greedy, prompts of ``--prompt-set`` (HumanEval by default): the first warms up; the second is decoded step by step,
reporting the median of the engine's own step record (``StepStats``: drafting, verify = the
target forward through the read of accepted tokens, the rest of the step) for steps that
verified a drafted tree and for plain steps. Then, on CUDA, ``torch.profiler`` covers
``--timeline-steps`` steps of the next prompt and prints, per CUDA stream and activity (copies,
kernels), its busy spans in microseconds from the first GPU event (gaps under 30 us merged,
with the number of events), and the runtime calls longer than 0.1 ms: a copy stream busy end
to end is a step at the copy floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.prompt_sets import load_prompt_set, prompt_token_ids
from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.models.loader import load_model


def step_medians(rows: list[tuple[int, float, float, float]]) -> str:
    """rows: (tokens, draft_s, verify_s, total_s) per step -> one line of medians (ms)."""
    if not rows:
        return "none"
    med = [statistics.median(r[i] for r in rows) for i in range(4)]
    rest = statistics.median(r[3] - r[1] - r[2] for r in rows)
    return (f"{len(rows)} steps, tokens {med[0]:.0f}, draft {1e3 * med[1]:.3f}, verify {1e3 * med[2]:.3f}, "
            f"rest {1e3 * rest:.3f}, total {1e3 * med[3]:.3f} ms (medians)")


def busy_spans(events: list[dict], merge_us: float = 30.0) -> list[tuple[int, int, int]]:
    """Trace events (ts, dur in us, sorted by ts) -> [(start, end, events)] with gaps under
    ``merge_us`` merged."""
    spans: list[list[float]] = []
    for event in events:
        start, end = event["ts"], event["ts"] + event["dur"]
        if spans and start - spans[-1][1] < merge_us:
            spans[-1][1] = max(spans[-1][1], end)
            spans[-1][2] += 1
        else:
            spans.append([start, end, 1])
    return [(round(a), round(b), int(n)) for a, b, n in spans]


def timeline(engine: LLMEngine, num_steps: int) -> list[str]:
    """Profile ``num_steps`` engine steps; lines of per-stream busy spans and long runtime calls."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            engine.step()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.loads(Path(trace.name).read_text())["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    gpu = sorted((e for e in spans if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    if not gpu:
        return ["no GPU events recorded"]
    origin = gpu[0]["ts"]
    for e in spans:
        e["ts"] -= origin
    lines, streams = [], {}
    for e in gpu:
        streams.setdefault((e["cat"], e["args"].get("stream")), []).append(e)
    for (cat, stream), stream_events in sorted(streams.items(), key=lambda kv: str(kv[0])):
        lines.append(f"stream {stream} {cat}: {len(stream_events)} events, busy spans (us, events): "
                     f"{busy_spans(stream_events)[:40]}")
    runtime = sorted((e for e in spans if e.get("cat") == "cuda_runtime" and e["dur"] > 100), key=lambda e: e["ts"])
    lines += [f"runtime {e['name']} at {round(e['ts'])} us for {round(e['dur'])} us" for e in runtime[:40]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-buffers", type=int, default=9)
    parser.add_argument("--spec", default='{"method":"ngram","max_tree_tokens":256,"max_depth":32,"widths":[16]}')
    parser.add_argument("--prompt-set", default="humaneval", help="humaneval, chat, ... (bench.prompt_sets)")
    parser.add_argument("--num-prompts", type=int, default=3, help="prompts: warm-up, measured, timeline")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeline-steps", type=int, default=4)
    args = parser.parse_args(argv)
    if args.num_buffers < 2 or args.num_prompts < 2 or args.max_tokens < 1 or args.timeline_steps < 1:
        parser.error("--num-buffers must be at least 2, --num-prompts 2, --max-tokens and --timeline-steps 1")
    try:  # bad input stops here, before the model loads
        prompt_set = load_prompt_set(args.prompt_set, args.num_prompts)
    except (ValueError, OSError) as exc:
        parser.error(f"--prompt-set: {exc}")
    cuda = torch.cuda.is_available()
    loaded = load_model(ModelConfig(device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32",
                                    offload=True, offload_buffers=args.num_buffers))
    prompts = [prompt_token_ids(loaded.tokenizer, p, prompt_set.chat_template) for p in prompt_set.prompts]
    engine = LLMEngine(EngineConfig(cache=CacheConfig(kv_cache_memory_gb=1.0),
                                    speculative=SpeculativeConfig.parse(args.spec)), loaded=loaded)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], params)  # warm-up
    rows = []
    engine.add_request(prompts[1], params)
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        stats = engine.last_step
        if stats is not None and stats.is_decode:
            rows.append((stats.num_tokens, stats.draft_s, stats.verify_s, stats.total_s))
    elapsed = time.perf_counter() - start
    print(f"{args.num_buffers} buffers, prompt 1, {args.max_tokens} tokens in {1e3 * elapsed:.1f} ms")
    print("drafted steps:", step_medians([r for r in rows if r[0] > 1]))
    print("plain steps:  ", step_medians([r for r in rows if r[0] == 1]))
    if cuda and len(prompts) > 2:
        engine.add_request(prompts[2], params)
        for _ in range(12):  # past the prefill and the first steps
            engine.step()
        print("\n".join(timeline(engine, args.timeline_steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
