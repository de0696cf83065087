"""Engine-level latency: our engine with and without speculation against transformers, same run.

    python -m bench.latency --prompt-set chat --prompt-set humaneval --num-prompts 8 \\
        --methods off,ngram,ngram32,hf,hf-lookup,hf-assisted \\
        --spec 'ngram32={"method": "ngram", "max_tree_tokens": 32}' --max-tokens 256 --tag h100

Methods (``--methods``, in the order given):
    off          our engine, speculation off: the baseline every speedup is measured against,
                 so --methods must list it
    NAME         our engine with the speculation ``--spec NAME=CONFIG`` defines (CONFIG as for
                 --speculative-config); a bare method name (ngram, early_exit) needs no --spec
    hf           transformers ``generate`` on the same weights and dtype (a transformers Llama
                 holding our loaded tensors: ``latency_runners.transformers_twin``)
    hf-lookup    transformers assisted generation by prompt lookup (``prompt_lookup_num_tokens``)
    hf-assisted  transformers assisted generation with a draft model: the target's first
                 --hf-draft-layers layers as a model of their own

Prompts run in groups of --batch-size, each group through every method in turn (so drift hits
all methods alike); one warm-up group per method runs first and is left out. Every method
generates exactly --max-tokens per prompt (EOS ignored) unless --stop-at-eos; sampling uses the
same seed per prompt for all methods (transformers: one seed per group). Metric definitions:
``bench/metrics.py``. Writes ``<out-dir>/latency_<tag>.json``, ``latency_<tag>_token_latency.png``
and ``latency_<tag>_accepted_length.png``, and prints a table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, environment, save_json
from bench.latency_runners import (
    EngineRunner,
    GenerationSettings,
    GroupResult,
    HFRunner,
    assistant_from_first_layers,
    transformers_twin,
)
from bench.metrics import Acceptance, mean_token_latency, speedup, summary_or_none, throughput
from bench.prompt_sets import WARMUP_TEXT, PromptSet, load_prompt_set, prompt_token_ids
from specserve.config import CacheConfig, EngineConfig, ModelConfig, SpeculativeConfig
from specserve.engine.gc_heap import freeze_startup_heap
from specserve.engine.llm_engine import LLMEngine
from specserve.errors import SpecserveError

HF_METHODS = ("hf", "hf-lookup", "hf-assisted")
HF_BATCH1_METHODS = ("hf-lookup", "hf-assisted")  # transformers' assisted generation is batch 1 only


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: str  # "engine" or one of HF_METHODS
    speculative: SpeculativeConfig | None = None


def resolve_methods(names: list[str], specs: list[str]) -> list[MethodSpec]:
    """--methods names, in order, with --spec NAME=CONFIG definitions; ValueError on a user mistake."""
    defined: dict[str, SpeculativeConfig] = {}
    for item in specs:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            raise ValueError(f"bad --spec {item!r}: write NAME=CONFIG, e.g. ngram16='{{\"method\": \"ngram\", \"max_tree_tokens\": 16}}'")
        if name in HF_METHODS or name == "off":
            raise ValueError(f"--spec name {name!r} is reserved: pick another name")
        defined[name] = SpeculativeConfig.parse(text)
    methods = []
    for name in names:
        if name in [m.name for m in methods]:
            raise ValueError(f"method {name!r} is listed twice in --methods")
        if name == "off":
            methods.append(MethodSpec("off", "engine", SpeculativeConfig()))
        elif name in HF_METHODS:
            methods.append(MethodSpec(name, name))
        elif name in defined:
            methods.append(MethodSpec(name, "engine", defined[name]))
        else:
            try:
                config = SpeculativeConfig.parse(name)
            except SpecserveError:
                raise ValueError(f"unknown method {name!r}: use off, hf, hf-lookup, hf-assisted, a speculation "
                                 "method name, or define it with --spec NAME=CONFIG") from None
            methods.append(MethodSpec(name, "engine", config))
    if "off" not in names:
        raise ValueError("--methods must list off: every speedup is measured against it in the same run")
    unused = sorted(set(defined) - set(names))
    if unused:
        raise ValueError(f"--spec defines {', '.join(unused)} but --methods does not list it: add it to --methods")
    return methods


def build_runners(args: argparse.Namespace, methods: list[MethodSpec], settings: GenerationSettings):
    """One runner per method over one loaded model (ours) and one transformers copy (hf*)."""
    from specserve.models.loader import load_model

    model_config = ModelConfig(model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
                               enforce_eager=args.enforce_eager)
    loaded = load_model(model_config)
    runners, skipped = {}, {}
    hf = None
    for method in methods:
        if method.kind == "engine":
            engine = LLMEngine(EngineConfig(
                model=model_config,
                cache=CacheConfig(kv_cache_memory_gb=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching),
                speculative=method.speculative,
            ), loaded=loaded)
            runners[method.name] = EngineRunner(engine, settings)
            continue
        if method.kind in HF_BATCH1_METHODS and args.batch_size > 1:
            skipped[method.name] = "transformers' assisted generation supports batch size 1 only"
            continue
        if hf is None:
            hf = transformers_twin(loaded)
            if hf is None:
                from bench.engine_vs_hf import load_hf_model

                hf = load_hf_model(args.model, loaded.dtype, loaded.device)
        pad = hf.generation_config.pad_token_id
        pad = loaded.eos_token_ids[0] if pad is None else pad
        kwargs: dict[str, Any] = {}
        if method.kind == "hf-lookup":
            kwargs = {"prompt_lookup_num_tokens": args.hf_lookup_tokens}
        elif method.kind == "hf-assisted":
            draft = assistant_from_first_layers(hf, args.hf_draft_layers)
            draft.generation_config.num_assistant_tokens = args.hf_assistant_tokens
            draft.generation_config.num_assistant_tokens_schedule = "constant"
            kwargs = {"assistant_model": draft}
        runners[method.name] = HFRunner(hf, settings, tuple(loaded.eos_token_ids), pad, kwargs)
    return loaded, runners, skipped


def request_row(prompt_index: int, group: int, num_prompt_tokens: int, record, off_ids: list[int] | None) -> dict:
    t = record.timeline
    row = {
        "prompt_index": prompt_index,
        "group": group,
        "num_prompt_tokens": num_prompt_tokens,
        "num_tokens": len(record.token_ids),
        "finish_reason": record.finish_reason,
        "ttft_s": t.ttft(),
        "e2e_s": t.e2e(),
        "tpot_s": t.tpot(),
        "observation_times_s": [round(x - t.start, 6) for x in t.times],
        "observation_num_tokens": list(t.num_tokens),
        "num_verify_steps": record.acceptance.num_steps,
        "num_accepted_tokens": record.acceptance.num_accepted_tokens,
        "accepted_per_depth": list(record.acceptance.accepted_per_depth),
        "num_switch_offs": record.num_switch_offs,
        "num_switched_off_steps": record.num_switched_off_steps,
    }
    if off_ids is not None:
        row["identical_to_off"] = record.token_ids == off_ids
        row["identical_prefix_tokens"] = next(
            (i for i, (a, b) in enumerate(zip(record.token_ids, off_ids)) if a != b), min(len(record.token_ids), len(off_ids)))
    return row


def method_summary(groups: list[GroupResult]) -> dict[str, Any]:
    records = [r for g in groups for r in g.requests]
    timelines = [r.timeline for r in records]
    acceptance = sum((r.acceptance for r in records), Acceptance())
    decode_steps = [s for g in groups for s in g.steps if s.decode_only]
    num_tokens = sum(len(r.token_ids) for r in records)
    wall_s = sum(g.wall_s for g in groups)
    token_latency = mean_token_latency(timelines)
    return {
        "num_requests": len(records),
        "num_tokens": num_tokens,
        "wall_s": wall_s,
        "tokens_per_s": throughput(num_tokens, wall_s),
        "token_latency_ms": summary_or_none([x for t in timelines for x in t.token_latencies()], 1000),
        "mean_token_latency_ms": None if token_latency is None else 1000 * token_latency,
        "tpot_ms": summary_or_none([t.tpot() for t in timelines], 1000),
        "itl_ms": summary_or_none([x for t in timelines for x in t.itl()], 1000),
        "ttft_ms": summary_or_none([t.ttft() for t in timelines], 1000),
        "e2e_s": summary_or_none([t.e2e() for t in timelines]),
        "mean_accepted_length": acceptance.mean_accepted_length,
        "acceptance_per_depth": acceptance.rate_per_depth,
        "accepted_length_histogram": acceptance.length_histogram,
        "num_verify_steps": acceptance.num_steps,
        "num_decode_steps": len(decode_steps),
        "draft_ms_per_step": summary_or_none([s.draft_s for s in decode_steps], 1000),
        "verify_ms_per_step": summary_or_none([s.verify_s for s in decode_steps], 1000),
        "step_ms": summary_or_none([s.total_s for s in decode_steps], 1000),
        "mean_draft_tokens_per_step": (sum(s.num_draft_tokens for s in decode_steps) / len(decode_steps)) if decode_steps else None,
        "num_switch_offs": sum(r.num_switch_offs for r in records),
        "num_switched_off_steps": sum(r.num_switched_off_steps for r in records),
        "num_gate_closed_steps": sum(not s.gate_open for s in decode_steps),
    }


def run_prompt_set(prompt_set: PromptSet, prompt_ids: list[list[int]], runners: dict, args, budget_s: float | None,
                   log) -> dict[str, Any]:
    """Every group through every method in turn; stops early (whole groups) past ``budget_s``."""
    batch = args.batch_size
    groups: dict[str, list[GroupResult]] = {name: [] for name in runners}
    rows: dict[str, list[dict]] = {name: [] for name in runners}
    started = time.perf_counter()
    truncated = False
    for first in range(0, len(prompt_ids), batch):
        elapsed = time.perf_counter() - started
        done = first // batch
        if budget_s is not None and done and elapsed + elapsed / done > budget_s:
            truncated = True
            log(f"  {prompt_set.name}: time budget reached after {first} prompts")
            break
        indices = list(range(first, min(first + batch, len(prompt_ids))))
        group_prompts = [prompt_ids[i] for i in indices]
        seeds = [None if args.unseeded else args.seed + i for i in indices]
        group_results = {name: runner.run_group(group_prompts, seeds) for name, runner in runners.items()}
        off = group_results.get("off")
        for name, result in group_results.items():
            groups[name].append(result)
            for k, (i, record) in enumerate(zip(indices, result.requests)):
                off_ids = None if off is None else off.requests[k].token_ids
                rows[name].append(request_row(i, done, len(prompt_ids[i]), record, off_ids))
        log(f"  {prompt_set.name}: {indices[-1] + 1}/{len(prompt_ids)} prompts, {time.perf_counter() - started:.0f} s")
    methods = {}
    off_summary = None
    for name in runners:
        summary = method_summary(groups[name])
        if name == "off":
            off_summary = summary
        methods[name] = {"summary": summary, "requests": rows[name],
                         "steps": [asdict(s) for g in groups[name] for s in g.steps]}
    for name in runners:
        summary = methods[name]["summary"]
        summary["speedup_vs_off"] = speedup(off_summary and off_summary["tokens_per_s"], summary["tokens_per_s"])
        off_latency = off_summary and off_summary["mean_token_latency_ms"]
        own = summary["mean_token_latency_ms"]
        summary["token_latency_speedup_vs_off"] = off_latency / own if off_latency and own else None
        compared = [r["identical_to_off"] for r in rows[name] if "identical_to_off" in r]
        summary["identical_to_off"] = sum(compared) if off_summary else None
        summary["num_compared_to_off"] = len(compared) if off_summary else None
    return {"num_prompts": len(prompt_ids), "num_prompts_measured": len(rows[next(iter(runners))]),
            "truncated_by_time_budget": truncated, "chat_template": prompt_set.chat_template,
            "mean_prompt_tokens": sum(map(len, prompt_ids)) / max(1, len(prompt_ids)), "methods": methods}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(result: dict[str, Any]) -> None:
    header = (f"{'method':<14}{'ms/tok':>8}{'p50':>7}{'p90':>7}{'TPOT':>7}{'TTFT ms':>9}{'tok/s':>8}"
              f"{'acc.len':>8}{'draft ms':>9}{'verify ms':>10}{'speedup':>8}{'same':>7}")
    for set_name, prompt_set in result["prompt_sets"].items():
        print(f"\n{set_name}: {prompt_set['num_prompts_measured']} prompts, batch {result['config']['batch_size']}, "
              f"{result['config']['max_tokens']} tokens each")
        print(header)
        for name, method in prompt_set["methods"].items():
            s = method["summary"]
            tl, tpot, ttft = s["token_latency_ms"] or {}, s["tpot_ms"] or {}, s["ttft_ms"] or {}
            draft, verify = s["draft_ms_per_step"] or {}, s["verify_ms_per_step"] or {}
            same = "-" if s["identical_to_off"] is None else f"{s['identical_to_off']}/{s['num_compared_to_off']}"
            print(f"{name:<14}{fmt(tl.get('mean'), '.2f'):>8}{fmt(tl.get('p50'), '.2f'):>7}{fmt(tl.get('p90'), '.2f'):>7}"
                  f"{fmt(tpot.get('mean'), '.2f'):>7}{fmt(ttft.get('mean'), '.1f'):>9}{fmt(s['tokens_per_s'], '.1f'):>8}"
                  f"{fmt(s['mean_accepted_length'], '.2f'):>8}{fmt(draft.get('mean'), '.2f'):>9}"
                  f"{fmt(verify.get('mean'), '.2f'):>10}{fmt(s['speedup_vs_off'], '.2f'):>8}{same:>7}")
        for name, reason in result["skipped_methods"].items():
            print(f"{name:<14}skipped: {reason}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-set", action="append", default=None,
                        help="humaneval, chat, random:LEN, alphabet:LEN or a JSONL file (repeatable; default: chat)")
    template = parser.add_mutually_exclusive_group()
    template.add_argument("--chat-template", dest="files_chat_template", action="store_true", default=True,
                          help="JSONL files: apply the chat template (default)")
    template.add_argument("--raw", dest="files_chat_template", action="store_false", help="JSONL files: send the text raw")
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts per set (cap)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated: off, hf, hf-lookup, hf-assisted, --spec names, method names "
                             "(default: off, every --spec or ngram, hf)")
    parser.add_argument("--spec", action="append", default=[], metavar="NAME=CONFIG",
                        help="a speculative config to time under NAME (repeatable)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts run together through one engine")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i in every method")
    parser.add_argument("--unseeded", action="store_true",
                        help="sampled requests carry no seed (our engines draw their own from --seed): the "
                             "per-request switch-off never applies to seeded sampled requests")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (default: always --max-tokens)")
    parser.add_argument("--warmup-tokens", type=int, default=64, help="tokens of the warm-up group (capped at --max-tokens)")
    parser.add_argument("--hf-lookup-tokens", type=int, default=6, help="hf-lookup: prompt_lookup_num_tokens")
    parser.add_argument("--hf-draft-layers", type=int, default=4, help="hf-assisted: layers of the target in the draft")
    parser.add_argument("--hf-assistant-tokens", type=int, default=6, help="hf-assisted: num_assistant_tokens (constant)")
    parser.add_argument("--model", default=None, help="GGUF file or checkpoint folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=ModelConfig.enforce_eager,
                        help="our engines: every forward eager; --no-enforce-eager replays CUDA graphs (CUDA only)")
    parser.add_argument("--kv-cache-memory", type=float, default=1.0, help="GB of KV cache per engine")
    parser.add_argument("--no-prefix-caching", action="store_true", help="our engines: do not share prompt prefixes")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the measured runs, split evenly over the sets; whole groups stop past it")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--tag", default=None, help="file name tag (default: cpu or gpu)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    for flag in ("num_prompts", "batch_size", "max_tokens", "warmup_tokens", "hf_lookup_tokens", "hf_assistant_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    args.prompt_set = args.prompt_set or ["chat"]
    if args.methods is None:
        names = [item.partition("=")[0].strip() for item in args.spec] or ["ngram"]
        args.methods = ",".join(["off", *names, "hf"])
    try:
        args.method_specs = resolve_methods([m.strip() for m in args.methods.split(",") if m.strip()], args.spec)
    except (ValueError, SpecserveError) as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    settings = GenerationSettings(args.max_tokens, args.temperature, ignore_eos=not args.stop_at_eos)
    prompt_sets = [load_prompt_set(s, args.num_prompts, files_chat_template=args.files_chat_template, seed=args.seed)
                   for s in args.prompt_set]
    log(f"loading the model and {len(args.method_specs)} methods")
    loaded, runners, skipped = build_runners(args, args.method_specs, settings)
    tokenizer = loaded.tokenizer
    vocab = loaded.arch.vocab_size
    all_ids = []
    for prompt_set in prompt_sets:
        ids = [prompt_token_ids(tokenizer, p, prompt_set.chat_template) for p in prompt_set.prompts]
        if any(t >= vocab for p in ids for t in p):
            raise SystemExit(f"prompt set {prompt_set.name} has token ids beyond this model's vocabulary ({vocab})")
        all_ids.append(ids)
    warmup_ids = prompt_token_ids(tokenizer, WARMUP_TEXT, bool(getattr(tokenizer, "chat_template", None)))
    warmup_tokens = min(args.warmup_tokens, args.max_tokens)
    for name, runner in runners.items():  # warm-up: kernels compiled, allocators grown; left out
        log(f"warm-up: {name}")
        runner.run_group([warmup_ids] * args.batch_size, [None if args.unseeded else args.seed] * args.batch_size,
                         warmup_tokens)
    freeze_startup_heap()  # the engines live to the end: no full collection walks them mid-run
    budget = None if args.time_budget is None else args.time_budget / len(prompt_sets)
    results = {}
    for prompt_set, ids in zip(prompt_sets, all_ids):
        log(f"measuring {prompt_set.name}")
        results[prompt_set.name] = run_prompt_set(prompt_set, ids, runners, args, budget, log)
    device = loaded.device
    tag = args.tag or ("gpu" if device.type == "cuda" else "cpu")
    config = {k: v for k, v in vars(args).items() if k != "method_specs"}
    result = {
        "benchmark": "latency",
        "description": "per-request token timelines of our engine (speculation off and on) and transformers "
                       "generate, same prompts, same run; warm-up excluded",
        "definitions": "see the docstring of bench/metrics.py; ms/tok = token latency, speedup = tokens/s over off",
        "command": shlex.join(["python", "-m", "bench.latency", *(argv if argv is not None else sys.argv[1:])]),
        "config": config | {"model_name": loaded.name, "dtype": str(loaded.dtype), "device": str(device),
                            "method_configs": {m.name: {"kind": m.kind, "speculative": None if m.speculative is None else
                                                 asdict(m.speculative)} for m in args.method_specs}},
        "environment": environment(),
        "skipped_methods": skipped,
        "prompt_sets": results,
    }
    out_dir = Path(args.out_dir)
    path = save_json(f"latency_{tag}", result, out_dir / f"latency_{tag}.json")
    print_table(result)
    print(f"\n-> {path}")
    if not args.no_plots:
        from bench.plots import plot_result

        for png in plot_result(result, out_dir / f"latency_{tag}"):
            print(f"-> {png}")
    return result


if __name__ == "__main__":
    main()
