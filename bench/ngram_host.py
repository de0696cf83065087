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

Indexing alone (``--indexing``): the host cost per token of a sequence's index catching up on
runs of 1, 16, 128 and 512 new tokens (after a ``--prompt-len`` prompt), and of the corpus
indexing a document of ``--prompt-len`` tokens, before (token by token, as the drafter indexed
until ``index_ngrams`` keyed whole runs) and now, in the same run; median of repeats, garbage
collector paused while timed:

    python -m bench.ngram_host --indexing
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable, Iterator

from draft_models.base import DraftRequest
from draft_models.ngram import (
    KEY_BITS,
    NgramCorpus,
    NgramDrafter,
    NgramIndex,
    scan_continuations,
)
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
    parser.add_argument("--indexing", action="store_true", help="also time indexing per token, before and now")
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
    if args.indexing:
        indexing_per_token(args.prompt_len, args.alphabet)
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


def ngram_keys_before(tokens: list[int], first_end: int, n_min: int, n_max: int) -> Iterator[tuple[int, int, int]]:
    """(n, key, start) of every n-gram, n in [n_min, n_max], ending from ``first_end`` on: how the
    drafter keyed n-grams before ``index_ngrams``, one token at a time through a generator."""
    for end in range(first_end, len(tokens)):
        key = 0
        for n in range(1, min(n_max, end + 1) + 1):
            key |= tokens[end + 1 - n] << (KEY_BITS * (n - 1))
            if n >= n_min:
                yield n, key, end + 1 - n


def sync_before(index: NgramIndex, token_ids: list[int]) -> None:
    """``NgramIndex.sync`` before ``index_ngrams``: every token checked and keyed one at a time."""
    known = len(index.tokens)
    new = token_ids[known:]
    bad = next((token for token in new if not 0 <= token < 1 << KEY_BITS), None)
    if bad is not None:
        raise ValueError(f"token id {bad} does not fit an n-gram key")
    index.tokens.extend(new)
    for n, key, start in ngram_keys_before(index.tokens, known, index.n_min, index.n_max):
        index.starts[n].setdefault(key, []).append(start)


def corpus_index_before(corpus: NgramCorpus, number: int, tokens: list[int]) -> None:
    """``NgramCorpus._index`` before ``index_ngrams``."""
    corpus.num_indexed += len(tokens)
    for n, key, start in ngram_keys_before(tokens, 0, corpus.n_min, corpus.n_max):
        corpus.starts[n].setdefault(key, []).append(number << 32 | start)


def copy_starts(starts: dict[int, dict[int, list[int]]]) -> dict[int, dict[int, list[int]]]:
    return {n: {key: list(found) for key, found in by_key.items()} for n, by_key in starts.items()}


def median_call_s(prepare: Callable[[], object], call: Callable[[object], None], repeats: int) -> float:
    """Median time of ``call(prepare())`` (only the call timed, the garbage collector paused)."""
    times = []
    for _ in range(repeats):
        state = prepare()
        gc.disable()
        start = time.perf_counter()
        call(state)
        times.append(time.perf_counter() - start)
        gc.enable()
    return statistics.median(times)


def indexing_per_token(prompt_len: int, alphabet: int, runs: tuple[int, ...] = (1, 16, 128, 512)) -> None:
    """Print the host time per token of a sequence's index catching up on each of ``runs`` new
    tokens after a ``prompt_len`` prompt, and of indexing a ``prompt_len`` corpus document,
    before and now (both give identical indexes)."""
    rng = random.Random(0)
    for run in runs:
        token_ids = [rng.randrange(alphabet) for _ in range(prompt_len + run)]
        synced = NgramIndex(1, 4)
        synced.sync(token_ids[:prompt_len])

        def prepare(synced: NgramIndex = synced) -> NgramIndex:
            index = NgramIndex(1, 4)
            index.tokens, index.starts = list(synced.tokens), copy_starts(synced.starts)
            return index

        before, now = prepare(), prepare()
        sync_before(before, token_ids)
        now.sync(token_ids)
        assert before.starts == now.starts
        repeats = max(15, 3000 // run)
        before_s = median_call_s(prepare, lambda index, t=token_ids: sync_before(index, t), repeats)
        now_s = median_call_s(prepare, lambda index, t=token_ids: index.sync(t), repeats)
        print(f"sync of {run} new tokens (n 1-4, after {prompt_len}): before {1e6 * before_s / run:.2f} us/token, "
              f"now {1e6 * now_s / run:.2f} us/token ({before_s / now_s:.2f}x)")
    docs = [[rng.randrange(alphabet) for _ in range(prompt_len)] for _ in range(11)]
    indexed = NgramCorpus(max_tokens=len(docs) * prompt_len)
    for doc in docs:
        indexed.add(doc)
    indexed.next_unindexed = indexed.next - 1  # the newest document is left to index
    indexed.index_pending()  # (the rest are)

    def prepare_corpus() -> NgramCorpus:
        corpus = NgramCorpus(indexed.max_tokens)
        corpus.starts = copy_starts(indexed.starts)
        return corpus

    before, now = prepare_corpus(), prepare_corpus()
    corpus_index_before(before, 10, docs[-1])
    now._index(10, docs[-1])
    assert before.starts == now.starts
    before_s = median_call_s(prepare_corpus, lambda corpus: corpus_index_before(corpus, 10, docs[-1]), 200)
    now_s = median_call_s(prepare_corpus, lambda corpus: corpus._index(10, docs[-1]), 200)
    print(f"corpus document of {prompt_len} tokens (n 2-4, after {len(docs) - 1}): before {1e6 * before_s / prompt_len:.2f} "
          f"us/token, now {1e6 * now_s / prompt_len:.2f} us/token ({before_s / now_s:.2f}x)")


if __name__ == "__main__":
    raise SystemExit(main())
