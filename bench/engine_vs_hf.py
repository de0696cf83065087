"""Incremental greedy decoding, batch 1: our engine (speculation off) against transformers'
``generate`` on the same model and prompts, side by side in one run.

    python -m bench.engine_vs_hf --num-prompts 8 --max-tokens 64 --out bench/results/engine_vs_hf_cpu.json

Both generate exactly --max-tokens tokens per prompt (EOS ignored) so per-token times compare.
One warm-up prompt per method is run first and left out.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from bench.common import PROMPTS_DIR, environment, load_prompts, save_json, sync
from bench.metrics import summarise
from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.prompts import chat_prompt_ids
from specserve.models.source import resolve_model


def load_hf_model(model: str | None, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    source = resolve_model(model)
    if source.kind == "gguf":
        hf = AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    return hf.to(device).eval()


def time_ours(engine: LLMEngine, prompt_ids: list[int], max_tokens: int) -> tuple[float, list[int], float]:
    """Seconds, generated ids, mean accepted length."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sync()
    start = time.perf_counter()
    out = engine.generate([prompt_ids], params)[0]
    sync()
    return time.perf_counter() - start, out.token_ids, out.mean_accepted_length


@torch.inference_mode()
def time_hf(hf, prompt_ids: list[int], max_tokens: int, device) -> tuple[float, list[int]]:
    input_ids = torch.tensor([prompt_ids], device=device)
    sync()
    start = time.perf_counter()
    out = hf.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
        min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
    )
    sync()
    return time.perf_counter() - start, out[0, len(prompt_ids):].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompts", default=str(PROMPTS_DIR / "chat.jsonl"))
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--speculative-config", default=None,
                        help="also time our engine with this speculation (e.g. ngram) in the same run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    engine = LLMEngine(EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype),
        cache=CacheConfig(kv_cache_memory_gb=1.0),
    ))
    device, dtype = engine.loaded.device, engine.loaded.dtype
    spec_config = SpeculativeConfig.parse(args.speculative_config)
    spec_engine = None
    if spec_config.enabled:
        spec_engine = LLMEngine(EngineConfig(
            model=ModelConfig(model=args.model, dtype=args.dtype),
            cache=CacheConfig(kv_cache_memory_gb=1.0), speculative=spec_config,
        ), loaded=engine.loaded)
    hf = load_hf_model(args.model, dtype, device)
    prompts = load_prompts(args.prompts, args.num_prompts + 1)
    prompt_ids = [chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": p}]) for p in prompts]

    time_ours(engine, prompt_ids[0], args.max_tokens)  # warm-up, excluded
    if spec_engine is not None:
        time_ours(spec_engine, prompt_ids[0], args.max_tokens)
    time_hf(hf, prompt_ids[0], args.max_tokens, device)
    rows = []
    for ids in prompt_ids[1:]:
        ours_s, ours_tokens, _ = time_ours(engine, ids, args.max_tokens)
        hf_s, hf_tokens = time_hf(hf, ids, args.max_tokens, device)
        spec = {}
        if spec_engine is not None:
            spec_s, spec_tokens, accepted = time_ours(spec_engine, ids, args.max_tokens)
            spec = {"spec_s": spec_s, "spec_ms_per_token": 1000 * spec_s / args.max_tokens,
                    "spec_mean_accepted_length": accepted, "spec_identical_to_off": spec_tokens == ours_tokens}
        same = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
        rows.append({
            "num_prompt_tokens": len(ids), "ours_s": ours_s, "hf_s": hf_s,
            "ours_ms_per_token": 1000 * ours_s / args.max_tokens,
            "hf_ms_per_token": 1000 * hf_s / args.max_tokens,
            "identical_prefix_tokens": next((i for i, (a, b) in enumerate(zip(ours_tokens, hf_tokens)) if a != b), args.max_tokens),
            "matching_tokens": same,
            **spec,
        })
    ours = summarise([r["ours_ms_per_token"] for r in rows])
    theirs = summarise([r["hf_ms_per_token"] for r in rows])
    result = {
        "benchmark": "engine_vs_hf",
        "description": "greedy incremental decoding, batch 1, speculation off, exactly max_tokens per prompt",
        "config": vars(args) | {"dtype": str(dtype), "model_name": engine.loaded.name},
        "environment": environment(),
        "ours_ms_per_token": ours,
        "transformers_ms_per_token": theirs,
        "speedup_mean": theirs["mean"] / ours["mean"],
        "per_prompt": rows,
    }
    if spec_engine is not None:
        spec_summary = summarise([r["spec_ms_per_token"] for r in rows])
        result["speculative_config"] = args.speculative_config
        result["spec_ms_per_token"] = spec_summary
        result["spec_speedup_over_off_mean"] = ours["mean"] / spec_summary["mean"]
        result["spec_mean_accepted_length"] = sum(r["spec_mean_accepted_length"] for r in rows) / len(rows)
        result["spec_identical_to_off"] = sum(r["spec_identical_to_off"] for r in rows)
    path = save_json(f"engine_vs_hf_{'gpu' if device.type == 'cuda' else 'cpu'}", result, args.out)
    print(f"{'method':<20}{'ms/token mean':>14}{'p50':>9}{'p90':>9}{'tok/s':>9}")
    methods = [("specserve", ours), ("transformers", theirs)]
    if spec_engine is not None:
        methods.insert(1, (f"specserve+{spec_config.method}", result["spec_ms_per_token"]))
    for name, s in methods:
        print(f"{name:<20}{s['mean']:>14.2f}{s['p50']:>9.2f}{s['p90']:>9.2f}{1000 / s['mean']:>9.1f}")
    print(f"speedup (transformers / specserve, same run): {result['speedup_mean']:.2f}x  -> {path}")
    if spec_engine is not None:
        print(f"speculation: {result['spec_speedup_over_off_mean']:.2f}x over off, mean accepted length "
              f"{result['spec_mean_accepted_length']:.2f}, identical outputs {result['spec_identical_to_off']}/{len(rows)}")


if __name__ == "__main__":
    main()
