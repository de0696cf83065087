"""Arguments shared by the subcommands, and their one-time conversion into config dataclasses."""

from __future__ import annotations

import argparse

from specserve.config import (
    DEVICES,
    DTYPES,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and engine")
    group.add_argument("--model", default=None, help="GGUF file or checkpoint folder (default: SmolLM2-135M-Instruct)")
    group.add_argument("--device", choices=DEVICES, default="auto")
    group.add_argument("--dtype", choices=DTYPES, default="auto")
    group.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + generated tokens")
    group.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one step")
    group.add_argument("--prefill-hold-steps", type=int, default=SchedulerConfig.prefill_hold_steps, metavar="N",
                       help="while the batch decodes, hold new requests up to N steps so that several join in "
                            "one step (default 0: admit at once)")
    group.add_argument("--prefill-hold-ratio", type=float, default=SchedulerConfig.prefill_hold_ratio,
                       metavar="R", help="with --prefill-hold-steps: admit once R x running requests wait "
                       "and there is room for them")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048, help="most tokens in one step")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks")
    group.add_argument("--kv-cache-memory", type=float, default=None, help="KV pool size in GB")
    group.add_argument("--no-prefix-caching", action="store_true", help="do not share prompt prefixes")
    group.add_argument("--offload", action="store_true",
                       help="keep the model's layers in CPU memory and stream them to the GPU per forward")
    group.add_argument("--gpu-memory-budget", type=float, default=None, metavar="GB",
                       help="with --offload: GB of weights that stay on the GPU (default: none)")
    group.add_argument("--offload-buffers", type=int, default=ModelConfig.offload_buffers, metavar="N",
                       help="with --offload: GPU working buffers streamed layers rotate through (at least 2; "
                            "default: 2 with --gpu-memory-budget, else enough to copy about 56 MB of layers ahead of each pass)")
    group.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction,
                       default=ModelConfig.enforce_eager,
                       help="run every forward eagerly (default: decode and verify steps replay "
                            "CUDA graphs on CUDA)")
    group.add_argument(
        "--speculative-config", default=None,
        help="'off', a method name (ngram), or JSON, e.g. '{\"method\": \"ngram\", \"max_tree_tokens\": 16}'",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(
            model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
            offload=args.offload, gpu_memory_budget_gb=args.gpu_memory_budget, offload_buffers=args.offload_buffers,
            enforce_eager=args.enforce_eager,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_kv_blocks,
            kv_cache_memory_gb=args.kv_cache_memory,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            prefill_chunk_size=min(512, args.max_num_batched_tokens),
            prefill_hold_steps=args.prefill_hold_steps,
            prefill_hold_ratio=args.prefill_hold_ratio,
        ),
        speculative=SpeculativeConfig.parse(args.speculative_config),
    )
