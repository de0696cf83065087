"""How well each drafter guesses: mean accepted length and acceptance per depth, greedy.

    python -m bench.acceptance --prompt-set chat --prompt-set humaneval --max-tokens 256 \\
        --method 'ngram={"method": "ngram", "max_tree_tokens": 64, "max_depth": 8}' \\
        --method 'draft1={"method": "draft", "draft_model": "smollm2-draft-1", "tree": "dynamic", ...}' \\
        --tag h100

Every prompt of a set runs through one engine per method, many sequences at once (acceptance
does not depend on the batch under greedy decoding), plus speculation off as the reference
whose outputs every method is compared with token for token. Definitions, per method and set:

    mean accepted length     1 + accepted draft tokens / verification steps, over all requests
    acceptance at depth d    share of steps that accepted at least d draft tokens
    draft tokens per step    draft tree nodes verified per step (the root not counted)
    (every method runs with ``switch_off`` false: the figures are the drafter's own)
    identical to off         requests whose tokens equal speculation off's (bf16: near-ties may
                             differ, both outputs are saved for inspection)

Writes ``<out-dir>/acceptance_<tag>.json`` (config, device, versions, per-request figures) and
``acceptance_<tag>.png``, and prints a table. Timings here are batch throughput figures, not
latency (see bench.latency for that).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS_DIR, environment, save_json
from bench.prompt_sets import load_prompt_set, prompt_token_ids
from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SchedulerConfig,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.errors import SpecserveError


def parse_methods(entries: list[str]) -> dict[str, SpeculativeConfig]:
    """``NAME=CONFIG`` entries (CONFIG as for --speculative-config) in order; "off" is implied."""
    methods: dict[str, SpeculativeConfig] = {}
    for entry in entries:
        name, sep, text = entry.partition("=")
        if not sep or not name or name == "off":
            raise ValueError(f"--method {entry!r}: write NAME=CONFIG, with NAME not 'off'")
        if name in methods:
            raise ValueError(f"--method {name!r} is given twice")
        try:
            methods[name] = SpeculativeConfig.parse(text)
        except SpecserveError as exc:
            raise ValueError(f"--method {name}: {exc}") from None
        if not methods[name].enabled:
            raise ValueError(f"--method {name}: give a speculative method, not off")
        # the drafter's own acceptance: no per-request switch-off hiding its bad steps
        methods[name] = replace(methods[name], switch_off=False)
    return methods


def summarise_acceptance(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures of one method on one set from its per-request records (see the module docstring)."""
    steps = sum(r["num_steps"] for r in records)
    accepted = sum(r["num_accepted_tokens"] for r in records)
    drafted = sum(r["num_draft_tokens"] for r in records)
    depth = max((len(r["accepted_per_depth"]) for r in records), default=0)
    per_depth = [sum(r["accepted_per_depth"][d] for r in records if d < len(r["accepted_per_depth"]))
                 for d in range(depth)]
    return {
        "num_requests": len(records),
        "num_steps": steps,
        "num_generated_tokens": sum(r["num_generated_tokens"] for r in records),
        "mean_accepted_length": round(1 + accepted / steps, 4) if steps else None,
        "acceptance_per_depth": [round(c / steps, 4) for c in per_depth] if steps else [],
        "draft_tokens_per_step": round(drafted / steps, 3) if steps else None,
        "identical_to_off": sum(r["identical_to_off"] for r in records),
    }


def run_method(engine: LLMEngine, prompts: list[list[int]], max_tokens: int,
               reference: list[list[int]] | None) -> tuple[list[dict[str, Any]], float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    records = []
    for i, out in enumerate(outs):
        records.append({
            "prompt_index": i,
            "num_prompt_tokens": out.num_prompt_tokens,
            "num_generated_tokens": out.num_generated_tokens,
            "num_steps": out.num_steps,
            "num_draft_tokens": out.num_draft_tokens,
            "num_accepted_tokens": out.num_accepted_tokens,
            "accepted_per_depth": list(out.accepted_per_depth),
            "identical_to_off": reference is None or list(out.token_ids) == reference[i],
            "token_ids": list(out.token_ids),
        })
    return records, wall


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(m for block in results.values() for m in block["methods"] if m != "off"))
    width = 0.8 / max(len(sets), 1)
    for k, name_set in enumerate(sets):
        measured = results[name_set]["methods"]
        values = [(measured[m]["mean_accepted_length"] or 0) if m in measured else 0 for m in names]
        axes[0].bar([i + k * width for i in range(len(names))], values, width, label=name_set)
    axes[0].set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
    axes[0].set_ylabel("mean accepted length (tokens per step)")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].legend()
    for name_set in sets:
        for m in (m for m in names if m in results[name_set]["methods"]):
            rates = results[name_set]["methods"][m]["acceptance_per_depth"]
            axes[1].plot(range(1, len(rates) + 1), rates, marker="o", label=f"{m} ({name_set})")
    axes[1].set_xlabel("depth d")
    axes[1].set_ylabel("share of steps accepting >= d drafts")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.acceptance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-set", action="append", default=None, help="humaneval, chat, random:LEN, alphabet:LEN or a JSONL file")
    p.add_argument("--num-prompts", type=int, default=None, help="cap per set (default: all)")
    p.add_argument("--method", action="append", default=[], metavar="NAME=CONFIG")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-memory", type=float, default=4.0, help="GB of KV cache per engine")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--tag", default="local")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no method after this many seconds (the rest is recorded as skipped)")
    p.add_argument("--replot", metavar="JSON", default=None, help="only redraw the plot of a saved run")
    args = p.parse_args(argv)
    if args.replot:
        saved = Path(args.replot)
        plot(json.loads(saved.read_text())["results"], saved.with_suffix(".png"))
        return 0
    try:
        methods = parse_methods(args.method)
        if args.max_tokens < 1 or args.max_num_seqs < 1:
            raise ValueError("--max-tokens and --max-num-seqs must be at least 1")
        sets = [load_prompt_set(s, args.num_prompts) for s in (args.prompt_set or ["chat"])]
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from specserve.models.loader import load_model

    start = time.perf_counter()
    model_config = ModelConfig(model=args.model, device=args.device, dtype=args.dtype)
    loaded = load_model(model_config)
    results: dict[str, dict[str, Any]] = {}
    payload = {
        "benchmark": "acceptance",
        "command": "python -m bench.acceptance " + " ".join(_quote(a) for a in (argv or sys.argv[1:])),
        "config": {"model": loaded.name, "dtype": str(loaded.dtype), "max_tokens": args.max_tokens,
                   "max_num_seqs": args.max_num_seqs, "greedy": True, "stop_at_eos": True},
        "environment": environment(),
        "results": results,
        "skipped": [],
    }
    out_dir = Path(args.out_dir)
    path = out_dir / f"acceptance_{args.tag}.json"
    for prompt_set in sets:
        prompts = [prompt_token_ids(loaded.tokenizer, x, prompt_set.chat_template) for x in prompt_set.prompts]
        per_method: dict[str, Any] = {}
        results[prompt_set.name] = {"num_prompts": len(prompts), "methods": per_method}
        reference = None
        for name, spec in [("off", SpeculativeConfig()), *methods.items()]:
            if args.deadline_s is not None and time.perf_counter() - start > args.deadline_s:
                payload["skipped"].append({"set": prompt_set.name, "method": name, "why": "--deadline-s passed"})
                continue
            try:
                engine = LLMEngine(EngineConfig(
                    model=model_config, cache=CacheConfig(kv_cache_memory_gb=args.kv_cache_memory),
                    scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs), speculative=spec,
                ), loaded=loaded)
            except SpecserveError as exc:
                print(f"error: method {name}: {exc}", file=sys.stderr)
                return 2
            engine.generate([prompts[0]], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
            records, wall = run_method(engine, prompts, args.max_tokens, reference)
            if name == "off":
                reference = [r["token_ids"] for r in records]
            per_method[name] = {"config": asdict(spec), **summarise_acceptance(records),
                                "wall_s": round(wall, 3), "requests": records}
            summary = per_method[name]
            print(f"[{prompt_set.name}] {name:>12}: mean accepted {summary['mean_accepted_length']}, "
                  f"identical to off {summary['identical_to_off']}/{summary['num_requests']}, {wall:.1f}s",
                  file=sys.stderr, flush=True)
            del engine
            gc.collect()  # an engine's runner and graphs refer to each other: free its KV pool now
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            save_json(path.stem, payload, path)  # after every method: a cut-off run keeps what it measured
    save_json(path.stem, payload, path)
    if not args.no_plot:
        plot(results, out_dir / f"acceptance_{args.tag}.png")
    print(f"{'set':<12}{'method':<16}{'accepted':>9}{'per depth (>= d)':>40}{'same as off':>13}")
    for set_name, block in results.items():
        for name, m in block["methods"].items():
            depth = " ".join(f"{x:.2f}" for x in m["acceptance_per_depth"][:8])
            print(f"{set_name:<12}{name:<16}{m['mean_accepted_length'] or 1.0:>9.3f}{depth:>40}"
                  f"{m['identical_to_off']:>8}/{m['num_requests']}")
    print(f"wrote {path}")
    return 0


def _quote(arg: str) -> str:
    return json.dumps(arg) if " " in arg or "{" in arg else arg



if __name__ == "__main__":
    sys.exit(main())
