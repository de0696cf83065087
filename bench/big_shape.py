"""The fast path at a large model's shape, with RANDOM weights of that shape (say so wherever a
figure from here appears): decode against its memory floor, and verifying a tree against one
decode step.

    python -m bench.big_shape --out $OUT/big_shape_h200.json     # Llama-3-8B shape, bf16, GPU
    python -m bench.big_shape --quick                             # CPU smoke run, a tiny shape

Measured in one run, through the engine's own runner (CUDA graphs unless --enforce-eager):
- device memory bandwidth: the best of several 1 GB device-to-device copies, counting the bytes
  read and the bytes written;
- the memory floor of a decode step: the weight bytes over that bandwidth;
- decode: a 1-token step after ``--context`` cached tokens; verify: a tree of T nodes (heap
  order, node i's parent (i - 1) // 2) after the same context; medians of ``--repeats``, timed
  as the engine's own cost calibration times them (``calibration.measure_step_cost``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from bench.common import environment, save_json, sync
from bench.offload import LLAMA3_8B
from specserve.config import CacheConfig, EngineConfig, ModelConfig
from specserve.engine.calibration import measure_step_cost
from specserve.engine.llm_engine import LLMEngine
from specserve.models.loader import random_loaded
from specserve.tree import TokenTree

TINY = dataclasses.replace(LLAMA3_8B, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=16)


def device_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy (nan off CUDA)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def heap_tree(num_nodes: int) -> TokenTree:
    """A tree of ``num_nodes`` nodes, node i's parent (i - 1) // 2 (depth log2 of the size)."""
    return TokenTree(tuple([1] * num_nodes), tuple((i - 1) // 2 if i else -1 for i in range(num_nodes)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024, help="cached tokens before the step")
    parser.add_argument("--tree-sizes", default="16,64,128", help="tree sizes to verify, comma-separated")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=ModelConfig.enforce_eager)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny shape, short context")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        tree_sizes = sorted({int(n) for n in args.tree_sizes.split(",")})
        if any(n < 2 for n in tree_sizes) or args.context < 1 or args.repeats < 1:
            raise ValueError("tree sizes must be at least 2, --context and --repeats at least 1")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    arch, dtype = (TINY, torch.float32) if args.quick else (LLAMA3_8B, torch.bfloat16)
    context = min(args.context, 32) if args.quick else args.context
    loaded = random_loaded(arch, device, dtype, "tiny-shape-random" if args.quick else "llama3-8b-shape-random")
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    engine = LLMEngine(EngineConfig(model=ModelConfig(enforce_eager=args.enforce_eager),
                                    cache=CacheConfig(kv_cache_memory_gb=0.05 if args.quick else 2.0)), loaded=loaded)
    bandwidth = device_bandwidth_gbps(device)
    floor = weight_bytes / (bandwidth * 1e9)
    cost = measure_step_cost(engine.runner, (1, *tree_sizes), args.repeats, context, tree_of=heap_tree)
    decode = cost.seconds[0]
    verify = dict(zip(tree_sizes, cost.seconds[1:]))
    result = {
        "benchmark": "big_shape", "config": vars(args), "environment": environment(),
        "model": f"{loaded.name} (RANDOM {str(dtype).removeprefix('torch.')} weights of the real shape)",
        "weight_bytes": weight_bytes, "device_bandwidth_gbps": bandwidth, "memory_floor_s": floor,
        "cuda_graphs": engine.graph_buckets is not None, "context": context,
        "decode_s": decode, "decode_over_floor": decode / floor,
        "verify_s": verify, "verify_over_decode": {n: t / decode for n, t in verify.items()},
    }
    path = save_json("big_shape_" + ("gpu" if device.type == "cuda" else "cpu"), result, args.out)
    print(f"{result['model']}, context {context}, graphs {result['cuda_graphs']}")
    print(f"decode {1e3 * decode:.2f} ms; memory floor {1e3 * floor:.2f} ms ({bandwidth:.0f} GB/s): "
          f"{decode / floor:.2f}x")
    for n, t in verify.items():
        print(f"verify {n} tree tokens {1e3 * t:.2f} ms: {t / decode:.2f}x a decode step")
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
