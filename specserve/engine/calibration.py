"""How long a target forward takes for T tree tokens on this device: the cost curve that
decides how large a speculative tree pays (Sequoia's hardware-aware budget).

``measure_step_cost`` times forwards of synthetic chains over a fixed context through the
engine's own runner and pool (temporary sequences, freed afterwards); the curve is kept as JSON
under the cache folder, keyed by device, model and dtype, so start-up measures once per machine.
``StepCost`` interpolates it and ``select_nodes_by_cost`` picks how many of the batch's ranked
draft nodes to keep.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from specserve.engine.model_runner import ModelRunner, TreeBatchItem
from specserve.tree import TokenTree

CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CALIBRATION_CONTEXT = 256


@dataclass(frozen=True)
class StepCost:
    """Seconds of one target step by total tree tokens, piecewise linear between measured sizes."""

    sizes: tuple[int, ...]  # increasing token counts
    seconds: tuple[float, ...]

    def __call__(self, num_tokens: int) -> float:
        sizes, seconds = self.sizes, self.seconds
        if num_tokens <= sizes[0]:
            return seconds[0]
        for (n0, s0), (n1, s1) in zip(zip(sizes, seconds), zip(sizes[1:], seconds[1:])):
            if num_tokens <= n1:
                return s0 + (s1 - s0) * (num_tokens - n0) / (n1 - n0)
        slope = (seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2])
        return seconds[-1] + slope * (num_tokens - sizes[-1])

    def to_json(self) -> str:
        return json.dumps({"sizes": list(self.sizes), "seconds": list(self.seconds)})

    @classmethod
    def from_json(cls, text: str) -> StepCost:
        raw = json.loads(text)
        return cls(tuple(raw["sizes"]), tuple(raw["seconds"]))


def select_nodes_by_cost(cost: StepCost, ranked_probs: list[list[float]], draft_s: float = 0.0) -> list[int]:
    """How many of each sequence's ranked draft nodes to verify this step.

    ranked_probs[s]: sequence s's draft nodes' path probabilities, most probable first (the
    expected accepted drafts of its first k nodes is about their sum). Nodes of all sequences
    are taken in one order of decreasing probability (each sequence's own order kept), and the
    prefix maximising expected tokens per second, (B + sum) / (draft_s + cost(B + T)), wins.
    """
    num_seqs = len(ranked_probs)
    order = sorted(
        ((p, s, i) for s, probs in enumerate(ranked_probs) for i, p in enumerate(probs)),
        key=lambda item: (-item[0], item[2], item[1]),
    )
    best_total, best_rate, expected = 0, num_seqs / (draft_s + cost(num_seqs)), float(num_seqs)
    for total, (prob, _, _) in enumerate(order, start=1):
        expected += prob
        rate = expected / (draft_s + cost(num_seqs + total))
        if rate > best_rate:
            best_total, best_rate = total, rate
    counts = [0] * num_seqs
    for _, s, _ in order[:best_total]:
        counts[s] += 1
    return counts


@torch.inference_mode()
def measure_step_cost(
    runner: ModelRunner, sizes: tuple[int, ...] = CALIBRATION_SIZES, repeats: int = 5,
    context_len: int = CALIBRATION_CONTEXT, tree_of: Callable[[int], TokenTree] | None = None,
) -> StepCost:
    """Median seconds of a forward (logits of every row included) over a tree of each size
    (``tree_of(size)``; default a chain), after ``context_len`` cached tokens."""
    manager = runner.kv_manager
    seq_id = "__calibration__"
    context = [1] * (context_len + max(sizes))
    manager.add_sequence(seq_id, context)
    try:
        manager.allocate_slots(seq_id, 0, len(context))
        seconds = []
        for size in sizes:
            tree = TokenTree.chain([1] * size) if tree_of is None else tree_of(size)
            item = TreeBatchItem(seq_id, context_len, tree)
            rows = list(range(size))
            runner.run([item], rows)  # warm-up (Triton compiles, caches fill)
            times = []
            for _ in range(repeats):
                if runner.device.type == "cuda":
                    torch.cuda.synchronize(runner.device)
                start = time.perf_counter()
                logits, _ = runner.run([item], rows)
                logits.argmax(-1).tolist()  # the host read every real step ends with
                times.append(time.perf_counter() - start)
            seconds.append(sorted(times)[len(times) // 2])
    finally:
        manager.free(seq_id)
    return StepCost(tuple(sizes), tuple(seconds))


def load_or_measure(
    runner: ModelRunner, cache_file: Path | None, sizes: tuple[int, ...] = CALIBRATION_SIZES,
    context_len: int = CALIBRATION_CONTEXT,
) -> StepCost:
    if cache_file is not None and cache_file.is_file():
        try:
            return StepCost.from_json(cache_file.read_text())
        except (ValueError, KeyError):
            pass  # a damaged cache entry is measured again
    cost = measure_step_cost(runner, sizes, context_len=context_len)
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(cost.to_json())
        except OSError:
            pass
    return cost
