"""``specserve generate``: one prompt in, its completion out (plain text or one JSON object)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from specserve.cli.args import add_engine_args, engine_config_from_args
from specserve.config import SamplingParams
from specserve.engine.gc_heap import freeze_startup_heap
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.prompts import chat_prompt_ids, raw_prompt_ids
from specserve.errors import SpecserveError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="complete one prompt and print the result")
    parser.add_argument("prompt", nargs="?", default=None, help="the prompt (read from stdin if omitted)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 switches top-k off")
    parser.add_argument("--min-p", type=float, default=0.0, help="0 switches min-p off")
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 switches it off")
    parser.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                        help="add BIAS to token ID's logit (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_args(parser)
    parser.set_defaults(run=run)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if sys.stdin.isatty():
        raise SpecserveError("no prompt: pass it as an argument or pipe it on stdin")
    return sys.stdin.read()


def parse_logit_bias(items: list[str]) -> tuple[tuple[int, float], ...]:
    """``["42=-5", "7=1.5"]`` -> ((7, 1.5), (42, -5.0)); a later entry for an id replaces an earlier."""
    bias: dict[int, float] = {}
    for item in items:
        token_id, sep, value = item.partition("=")
        try:
            bias[int(token_id)] = float(value)
        except ValueError:
            raise SpecserveError(f"--logit-bias takes ID=BIAS, such as 42=-5, not {item!r}") from None
        if not sep:
            raise SpecserveError(f"--logit-bias takes ID=BIAS, such as 42=-5, not {item!r}")
    return tuple(sorted(bias.items()))


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        logit_bias=parse_logit_bias(args.logit_bias),
        seed=args.seed,
        stop=tuple(args.stop),
    )
    prompt = read_prompt(args)
    if prompt.strip() == "":
        raise SpecserveError("the prompt is empty: pass some text to complete")
    config = engine_config_from_args(args)
    engine = LLMEngine(config)
    freeze_startup_heap()
    if args.raw:
        prompt_ids = raw_prompt_ids(engine.tokenizer, prompt)
    else:
        prompt_ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": prompt}])
    start = time.perf_counter()
    output = engine.generate([prompt_ids], params)[0]
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps({
            "text": output.text,
            "token_ids": output.token_ids,
            "num_prompt_tokens": output.num_prompt_tokens,
            "num_generated_tokens": output.num_generated_tokens,
            "finish_reason": output.finish_reason,
            "elapsed_s": round(elapsed, 4),
            "tokens_per_s": round(output.num_generated_tokens / elapsed, 2) if elapsed > 0 else None,
            "num_steps": output.num_steps,
            "mean_accepted_length": round(output.mean_accepted_length, 4),
            "model": engine.loaded.name,
            "device": str(engine.loaded.device),
            "dtype": str(engine.loaded.dtype).removeprefix("torch."),
            "speculative_config": config.speculative.method,
        }))
    else:
        print(output.text)
    return 0
