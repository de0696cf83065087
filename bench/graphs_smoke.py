"""Eager vs CUDA-graph ms/token, batch 1, plain decode and ngram speculation (a smoke run).

    python -m bench.graphs_smoke [--max-tokens 128] [--repeats 3] [--out $OUT/graphs_smoke.json]

Both modes run in this process on one loaded model (default dtype: bf16 on CUDA). Each mode's
engine first generates one warm-up request (Triton compiles, graphs are captured), then the
timed requests; ms/token = wall time of a request / its generated tokens, median over repeats.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from bench.common import environment
from specserve.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SamplingParams,
    SpeculativeConfig,
)
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.prompts import chat_prompt_ids
from specserve.models.loader import load_model

PROMPT = "Write a Python function that checks whether a number is prime, then explain it line by line."
WORKLOADS = {"decode": SpeculativeConfig(), "ngram": SpeculativeConfig(method="ngram", max_tree_tokens=16)}


def measure(loaded, enforce_eager: bool, spec: SpeculativeConfig, max_tokens: int, repeats: int) -> dict:
    config = EngineConfig(model=ModelConfig(enforce_eager=enforce_eager), cache=CacheConfig(num_blocks=1024),
                          speculative=spec)
    engine = LLMEngine(config, loaded=loaded)
    prompt = chat_prompt_ids(loaded.tokenizer, [{"role": "user", "content": PROMPT}])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([prompt], params)  # warm-up
    ms_per_token, outputs = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = engine.generate([prompt], params)
        ms_per_token.append((time.perf_counter() - start) * 1e3 / len(outputs[0].token_ids))
    result = {
        "ms_per_token": statistics.median(ms_per_token),
        "ms_per_token_all": ms_per_token,
        "mean_accepted_length": outputs[0].mean_accepted_length,
        "num_graphs": engine.runner.graphs.num_captured if engine.runner.graphs else 0,
        "token_ids": outputs[0].token_ids,
    }
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graphs_smoke needs a CUDA device")
    loaded = load_model(ModelConfig(device="cuda"))
    results = {}
    print(f"{'workload':<8} {'eager ms/tok':>13} {'graphs ms/tok':>14} {'speed-up':>9} {'same tokens':>12}")
    for name, spec in WORKLOADS.items():
        eager = measure(loaded, True, spec, args.max_tokens, args.repeats)
        graphs = measure(loaded, False, spec, args.max_tokens, args.repeats)
        same = eager["token_ids"] == graphs["token_ids"]
        results[name] = {"eager": eager, "graphs": graphs, "same_tokens": same}
        print(f"{name:<8} {eager['ms_per_token']:>13.2f} {graphs['ms_per_token']:>14.2f} "
              f"{eager['ms_per_token'] / graphs['ms_per_token']:>8.2f}x {str(same):>12}"
              f"   (graphs captured: {graphs['num_graphs']}, accepted length {graphs['mean_accepted_length']:.2f})")
    record = {"config": {"max_tokens": args.max_tokens, "repeats": args.repeats, "dtype": str(loaded.dtype),
                         "prompt": PROMPT}, "environment": environment(), "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
