"""Host time of the n-gram drafter per engine step: the kept per-sequence index against a scan
of the whole sequence (the drafter before the index), on synthetic sequences (CPU, no model).

    python -m bench.ngram_host --num-seqs 16 --prompt-len 300 --steps 128

Each step, every sequence proposes a tree (16 tokens, depth 6, 4 paths) and then grows by 1-3
tokens from a small alphabet, so suffixes recur as in code. Both drafters propose the same trees.

Garbage collection: a loaded model leaves a large heap, which every full collection walks.
``--load-model`` keeps the default model (CPU, float32) alive meanwhile, and ``--freeze-heap``
freezes the heap first, as the server does (``specserve/engine/gc_heap.py``); the first step
(every prompt indexed) and the worst step are reported apart:

    python -m bench.ngram_host --num-seqs 32 --load-model [--freeze-heap]

Lookups against a full cross-request corpus (``--corpus SET``): the corpus is filled with the
set's prompts as the engine formats them (chat template included), two to a document, up to
``--corpus-tokens``; then every prompt of the set proposes once from its own end, the context of
its first decode step, where the template's last tokens are the suffix to match:

    python -m bench.ngram_host --corpus chat --corpus-tokens 60000
"""

from __future__ import annotations

import argparse
import gc
import random
import time

from draft_models.base import DraftRequest
from draft_models.ngram import NgramDrafter, scan_continuations
from specserve.errors import SpecserveError
from specserve.tree.builders import tree_from_paths_within_budget


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--alphabet", type=int, default=50)
    parser.add_argument("--load-model", action="store_true", help="keep the default model loaded (its heap)")
    parser.add_argument("--freeze-heap", action="store_true", help="freeze the heap before the steps (gc.freeze)")
    parser.add_argument("--corpus", default=None, metavar="SET", help="also time lookups against a corpus of SET's prompts")
    parser.add_argument("--corpus-tokens", type=int, default=60_000)
    args = parser.parse_args(argv)
    for flag in ("num_seqs", "prompt_len", "steps", "alphabet", "corpus_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    loaded = None
    if args.load_model:
        from specserve.config import ModelConfig
        from specserve.models.loader import load_model

        loaded = load_model(ModelConfig(device="cpu", dtype="float32"))
    if args.freeze_heap:
        gc.collect()
        gc.freeze()
    rng = random.Random(0)
    seqs = [[rng.randrange(args.alphabet) for _ in range(args.prompt_len)] for _ in range(args.num_seqs)]
    drafter = NgramDrafter(ngram_max=4, ngram_min=1, max_paths=4)
    indexed_s = scan_s = 0.0
    indexed_steps = []
    for _ in range(args.steps):
        requests = [DraftRequest(f"s{i}", seq, max_tree_tokens=15, max_depth=6) for i, seq in enumerate(seqs)]
        start = time.perf_counter()
        trees = drafter.propose(requests)
        indexed_steps.append(time.perf_counter() - start)
        indexed_s += indexed_steps[-1]
        start = time.perf_counter()
        scanned = [tree_from_paths_within_budget(seq[-1], scan_continuations(seq, 6, 1, 4, 4), 15) for seq in seqs]
        scan_s += time.perf_counter() - start
        assert trees == scanned
        for seq in seqs:
            seq.extend(rng.randrange(args.alphabet) for _ in range(rng.randint(1, 3)))
    print(f"{args.num_seqs} sequences, {args.prompt_len} + up to {3 * args.steps} tokens, {args.steps} steps: "
          f"scan {1e3 * scan_s / args.steps:.3f} ms/step, index {1e3 * indexed_s / args.steps:.3f} ms/step "
          f"({scan_s / indexed_s:.1f}x)")
    later = indexed_steps[1:] or indexed_steps
    print(f"index: first step {1e3 * indexed_steps[0]:.2f} ms, later steps mean {1e3 * sum(later) / len(later):.3f} ms, "
          f"worst {1e3 * max(later):.2f} ms (model loaded: {loaded is not None}, frozen: {args.freeze_heap}, {len(gc.get_objects())} objects tracked)")
    if args.freeze_heap:
        gc.unfreeze()
    if args.corpus is not None:
        try:
            corpus_lookups(args.corpus, args.corpus_tokens)
        except (ValueError, OSError, SpecserveError) as exc:
            parser.error(f"--corpus: {exc}")
    return 0


def corpus_lookups(set_name: str, corpus_tokens: int, repeats: int = 20) -> None:
    """Fill a corpus with ``set_name``'s formatted prompts, then time each prompt's lookup."""
    from bench.prompt_sets import load_prompt_set, prompt_token_ids
    from specserve.models.loader import load_model_tokenizer

    prompt_set = load_prompt_set(set_name)
    tokenizer = load_model_tokenizer()  # the default model's, no weights read
    prompts = [prompt_token_ids(tokenizer, p, prompt_set.chat_template) for p in prompt_set.prompts]
    drafter = NgramDrafter(ngram_max=4, ngram_min=1, max_paths=4, corpus_tokens=corpus_tokens)
    number = 0
    while drafter.corpus.num_tokens < corpus_tokens - 2 * max(map(len, prompts)):
        drafter.corpus.add(prompts[number % len(prompts)] + prompts[(7 * number + 3) % len(prompts)])
        number += 1
    times = []
    for i, prompt in enumerate(prompts):
        request = [DraftRequest(f"p{i}", prompt, max_tree_tokens=15, max_depth=6)]
        drafter.propose(request)  # indexes the prompt
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            drafter.propose(request)
            best = min(best, time.perf_counter() - start)
        times.append(best)
    print(f"corpus of {drafter.corpus.num_tokens} tokens ({number} documents of {set_name} prompts): a prompt's "
          f"first lookup {1e6 * sum(times) / len(times):.1f} us mean, {1e6 * max(times):.1f} us worst "
          f"(best of {repeats}, {len(prompts)} prompts)")


if __name__ == "__main__":
    raise SystemExit(main())
