"""What one target forward costs for the step shapes a serving engine meets, through the
engine's own runner (CUDA graphs on CUDA): decode batches, drafting batches and decode batches
with prompts riding along. Built for one figure (bench/README.md, "#7, serving"): at 32 in
flight the n-gram server's prompt-carrying and drafting steps took 10-20 ms, its plain steps
4-5 ms, and nothing said whether the forward or the host made the difference.

    python -m bench.step_buckets --model default                  # on the GPU
    python -m bench.step_buckets --random-shape --device cuda     # no weights needed: the same shapes
    python -m bench.step_buckets --device cpu --repeats 1 --case 2x1  # smoke run

A case is written DxT[+KxL]: D decoding sequences of T tree tokens each (a chain) over
``--context`` cached tokens, plus K prompts of L tokens prefilled from position 0. Per case:
the graph bucket (S sequences, T tokens; "eager" when none fits), the median seconds of
``ModelRunner.run`` with the host read every step ends with (argmax of the logit rows), and
with ``--profile`` the CUDA kernels of one run, longest first. ``--random-shape``: the default
model's shape (SmolLM2-135M) with RANDOM weights (``--dtype``; auto: bf16 on CUDA), which costs the same per forward
and needs no model file (the results say so).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from bench.common import environment, save_json, sync
from specserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.model_runner import TreeBatchItem
from specserve.models.config import LlamaArchConfig
from specserve.models.loader import load_model, random_loaded, resolve_device, resolve_dtype
from specserve.tree import TokenTree

DEFAULT_CASES = (
    "1x1", "16x1", "32x1", "64x1",  # plain decode
    "16x8", "32x8", "32x16",  # drafting
    "15x1+3x113", "31x1+1x113", "31x1+3x113", "29x1+3x140", "31x8+2x113",  # prompts beside a decoding batch
    "0x1+4x113",  # prompts alone
    "16x1+16x107", "28x1+4x113",  # off's 16-prompt step at 16 in flight (past 512 tokens: eager) and a 512-token share of it
)
SMOLLM2_135M = LlamaArchConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                               num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                               tie_word_embeddings=True)  # SmolLM2-135M-Instruct's shape
CASE = re.compile(r"^(\d+)x(\d+)(?:\+(\d+)x(\d+))?$")


@dataclass(frozen=True)
class Case:
    num_decode: int  # D decoding sequences
    tree_len: int  # T tokens each (root included)
    num_prompts: int = 0  # K prompts prefilled in the same forward
    prompt_len: int = 0  # L tokens each

    @classmethod
    def parse(cls, text: str) -> Case:
        match = CASE.match(text)
        if match is None:
            raise ValueError(f"bad case {text!r}: write DxT or DxT+KxL (numbers)")
        d, t, k, length = (int(g) if g is not None else 0 for g in match.groups())
        if t < 1 or (k and length < 1) or d + k < 1:
            raise ValueError(f"bad case {text!r}: T and L at least 1, and some sequence")
        return cls(d, t, k, length)

    @property
    def name(self) -> str:
        prompts = f"+{self.num_prompts}x{self.prompt_len}" if self.num_prompts else ""
        return f"{self.num_decode}x{self.tree_len}{prompts}"

    @property
    def num_tokens(self) -> int:
        return self.num_decode * self.tree_len + self.num_prompts * self.prompt_len


def build_items(engine: LLMEngine, case: Case, context: int, rng: random.Random) -> tuple[list[TreeBatchItem], list[int], list[str]]:
    """The case's items (prompts first, as the engine orders a step), their logit rows (every
    decode row, each prompt's last) and the temporary sequence ids, KV slots allocated. Token ids
    are random so no two sequences share a cached prefix."""
    manager, vocab = engine.kv_manager, engine.loaded.arch.vocab_size
    items, rows, ids, row = [], [], [], 0
    for i in range(case.num_prompts):
        seq_id, tokens = f"__prompt{i}__", [rng.randrange(vocab) for _ in range(case.prompt_len)]
        manager.add_sequence(seq_id, tokens)
        manager.allocate_slots(seq_id, 0, case.prompt_len)
        items.append(TreeBatchItem(seq_id, 0, TokenTree.chain(tokens)))
        ids.append(seq_id)
        row += case.prompt_len
        rows.append(row - 1)
    for i in range(case.num_decode):
        seq_id = f"__decode{i}__"
        tokens = [rng.randrange(vocab) for _ in range(context + case.tree_len)]
        manager.add_sequence(seq_id, tokens[:context])
        manager.allocate_slots(seq_id, 0, context + case.tree_len)
        items.append(TreeBatchItem(seq_id, context, TokenTree.chain(tokens[context:])))
        ids.append(seq_id)
        rows += list(range(row, row + case.tree_len))
        row += case.tree_len
    return items, rows, ids


@torch.inference_mode()
def time_case(engine: LLMEngine, case: Case, context: int, repeats: int, profile: bool) -> dict:
    runner = engine.runner
    items, rows, ids = build_items(engine, case, context, random.Random(case.name))
    try:
        bucket = None if runner.graphs is None else runner.graphs.bucket_for(items)
        eager_before = runner.num_eager_runs
        runner.run(items, rows)[0].argmax(-1).tolist()  # warm-up: compiles, captures a missing bucket
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            runner.run(items, rows)[0].argmax(-1).tolist()
            times.append(time.perf_counter() - start)
        kernels = None
        if profile and engine.loaded.device.type == "cuda":
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                runner.run(items, rows)[0].argmax(-1).tolist()
            events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
            kernels = [{"name": e.key[:90], "calls": e.count, "us": round(e.device_time_total, 1)}
                       for e in sorted(events, key=lambda e: -e.device_time_total)[:8]]
    finally:
        for seq_id in ids:
            engine.kv_manager.free(seq_id)
    return {"case": case.name, "tokens": case.num_tokens, "sequences": case.num_decode + case.num_prompts,
            "bucket": None if bucket is None else list(bucket),
            "eager": runner.graphs is not None and runner.num_eager_runs > eager_before,
            "ms": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times), "kernels": kernels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model path (default: the default model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--random-shape", action="store_true",
                        help="SmolLM2-135M's shape with RANDOM weights in --dtype (auto: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--case", action="append", default=None, help="DxT[+KxL], repeatable (default: a set of 15)")
    parser.add_argument("--context", type=int, default=256, help="cached tokens of every decoding sequence")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-num-seqs", type=int, default=64, help="the engine's (decides the graph buckets)")
    parser.add_argument("--kv-cache-memory", type=float, default=2.0, help="GB of KV cache")
    parser.add_argument("--profile", action="store_true", help="also the CUDA kernels of one run per case")
    parser.add_argument("--out", default=None, help="JSON file (default: bench/results/step_buckets_<device>.json)")
    args = parser.parse_args(argv)
    try:
        cases = [Case.parse(text) for text in (args.case or DEFAULT_CASES)]
    except ValueError as exc:
        parser.error(str(exc))
    if args.context < 1 or args.repeats < 1:
        parser.error("--context and --repeats must be positive")
    config = EngineConfig(model=ModelConfig(model=args.model, device=args.device, dtype=args.dtype),
                          cache=CacheConfig(kv_cache_memory_gb=args.kv_cache_memory),
                          scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs))
    too_many = [c.name for c in cases if c.num_decode + c.num_prompts > args.max_num_seqs]
    if too_many:
        parser.error(f"cases {too_many} have more sequences than --max-num-seqs {args.max_num_seqs}")
    if args.random_shape:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        loaded = random_loaded(SMOLLM2_135M, device, dtype, "smollm2-135m-shape-RANDOM-weights")
    else:
        loaded = load_model(config.model)
    engine = LLMEngine(config, loaded=loaded)
    results = []
    print(f"{engine.loaded.name} on {engine.loaded.device} ({engine.loaded.dtype}), context {args.context}, "
          f"median of {args.repeats}; graphs captured: {engine.num_graphs_captured}")
    print(f"{'case':<16}{'tokens':>8}{'bucket':>12}{'ms':>9}{'min ms':>9}")
    for case in cases:
        result = time_case(engine, case, args.context, args.repeats, args.profile)
        results.append(result)
        bucket = "eager" if result["bucket"] is None else "{}x{}".format(*result["bucket"])
        print(f"{case.name:<16}{case.num_tokens:>8}{bucket:>12}{result['ms']:>9.3f}{result['ms_min']:>9.3f}")
        for kernel in result["kernels"] or []:
            print(f"    {kernel['us']:>9.1f} us  x{kernel['calls']:<4} {kernel['name']}")
    payload = {"benchmark": "step_buckets", "config": vars(args), "environment": environment(),
               "model": engine.loaded.name, "dtype": str(engine.loaded.dtype),
               "graphs_captured": engine.num_graphs_captured, "results": results}
    path = save_json(f"step_buckets_{engine.loaded.device.type}", payload, args.out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
