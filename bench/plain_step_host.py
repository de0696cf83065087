"""Host cost of a plain decode step: an engine with a drafter whose batch gate keeps the step
plain should cost what the speculation-off engine costs (#7: speculation never below off).

    python -m bench.plain_step_host --batch-size 16

The target's forward is replaced by a stub returning fixed logits, so only the host's work is
timed (the real model is loaded for its tokenizer and shapes; CPU). Reports:
- ``propose`` on a plain step (every sequence with one slot: no draft requested), min over
  repeats of ``--number`` calls;
- whole engine steps, median per round over ``--rounds`` rounds of a batch of chat prompts,
  for speculation off and for n-gram with its gate closed (``bench.step_profile.close_gate``).
  Steps are a few milliseconds, so these medians move with the machine's load: compare rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch

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
from specserve.models.loader import load_model


def stub_forward(vocab_size: int):
    """A ``ModelRunner.run`` stand-in: logits [len(rows), vocab] whose argmax varies by row."""
    def run(items, rows, return_hidden=False, features=None, input_ids=None):
        logits = torch.zeros(len(rows), vocab_size)
        logits[torch.arange(len(rows)), (torch.arange(len(rows)) * 7919) % 3000 + 300] = 1.0
        return logits, None
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--number", type=int, default=200, help="propose calls per timing")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.max_tokens, args.rounds, args.number) < 1:
        parser.error("--batch-size, --max-tokens, --rounds and --number must be positive")
    torch.set_num_threads(1)
    loaded = load_model(ModelConfig(device="cpu", dtype="float32"))
    prompt_set = load_prompt_set("chat", args.batch_size)
    prompts = [prompt_token_ids(loaded.tokenizer, p, prompt_set.chat_template) for p in prompt_set.prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engines = {}
    for name, spec in (("off", "off"), ("ngram, gate closed", "ngram")):
        engines[name] = LLMEngine(EngineConfig(cache=CacheConfig(kv_cache_memory_gb=1.0),
                                               speculative=SpeculativeConfig.parse(spec)), loaded=loaded)
        engines[name].runner.run = stub_forward(loaded.arch.vocab_size)

    drafting = engines["ngram, gate closed"]
    for prompt in prompts:
        drafting.add_request(prompt, params)
    seqs = list(drafting.scheduler.waiting) + list(drafting.scheduler.running)
    plain = [1] * len(seqs)
    seconds = min(timeit.repeat(lambda: propose(drafting.drafter, seqs, plain), number=args.number, repeat=7))
    print(f"propose, {len(seqs)} sequences, plain step: {1e6 * seconds / args.number:.1f} us")
    for seq in seqs:
        drafting.abort(seq.request_id)

    medians: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            if engine.gate is not None:
                close_gate(engine, len(prompts))
            for prompt in prompts:
                engine.add_request(prompt, params)
            engine.step()  # the prefill
            times = []
            while engine.has_unfinished():
                start = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - start)
            medians[name].append(1e3 * statistics.median(times))
    for name, values in medians.items():
        print(f"{name}: step medians per round {', '.join(f'{v:.3f}' for v in values)} ms "
              f"(batch {len(prompts)}, forward stubbed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
