"""Continuations from several engine processes sharing one GPU.

A small target's decode step is bound by the host (Python scheduling, kernel launches), not
by the GPU, so ``num_workers`` processes, each with its own copy of the target and its own
engine, generate about ``num_workers`` times as fast until the GPU saturates. Worker w takes
jobs w, w + num_workers, ...; samples come back in job order, as from ``generate_samples``.

The parent must have loaded the target once before (its GGUF cache is then warm, and the
workers do not race to write it).
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from draft_models.distill_data import GenerationJob, Sample, generate_samples, generation_stats
from specserve.config import ModelConfig


def _worker(
    model_config: ModelConfig, jobs: list[GenerationJob], max_new_tokens: int, max_num_seqs: int, deadline: float
) -> tuple[list[Sample], dict[str, Any]]:
    import torch

    from specserve.models.loader import load_model

    torch.set_num_threads(1)
    return generate_samples(load_model(model_config), jobs, max_new_tokens, max_num_seqs, deadline)


def generate_samples_parallel(
    model_config: ModelConfig,
    jobs: list[GenerationJob],
    max_new_tokens: int,
    max_num_seqs: int,
    deadline: float,
    num_workers: int,
) -> tuple[list[Sample], dict[str, Any]]:
    """``generate_samples`` over ``num_workers`` processes; ``max_num_seqs`` is per worker."""
    start = time.perf_counter()
    shards = [jobs[w::num_workers] for w in range(num_workers)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=num_workers, mp_context=context) as pool:
        futures = [pool.submit(_worker, model_config, shard, max_new_tokens, max_num_seqs, deadline) for shard in shards]
        results = [future.result() for future in futures]
    order = {(j.split, j.prompt_index, j.temperature, j.seed): i for i, j in enumerate(jobs)}
    samples = sorted(
        (s for shard_samples, _ in results for s in shard_samples),
        key=lambda s: order[(s.split, s.prompt_index, s.temperature, s.seed)],
    )
    stats = generation_stats(samples, len(jobs), time.perf_counter() - start, max_num_seqs, max_new_tokens,
                             results[0][1]["device"], num_workers)
    stats["worker_tokens_per_s"] = [r[1]["tokens_per_s"] for r in results]
    return samples, stats
