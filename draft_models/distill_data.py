"""Distillation data: the prompts the repo ships, the target's own continuations of them, and
the target's teacher-forced hidden states over prompt + continuation.

Continuations come from the engine (batched, chat-templated exactly as inference builds its
prompts), greedy first and then temperature-sampled, and are cached as JSONL so later runs
and every boost round reuse them. The evaluation sets (bench/prompts/chat.jsonl, HumanEval)
are never read here; tests/draft_models/test_training_prompts.py checks they do not overlap.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from draft_models.dense_forward import causal_hidden, pad_batch
from specserve.config import CacheConfig, EngineConfig, SamplingParams, SchedulerConfig
from specserve.engine.llm_engine import LLMEngine
from specserve.engine.prompts import chat_prompt_ids
from specserve.models.loader import LoadedModel

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLES_FORMAT = "specserve-draft-samples/1"
# synthetic requests: every topic of data/topics.txt through every template
PROMPT_TEMPLATES = (
    "Explain the basics of {topic} to a beginner.",
    "Give me three practical tips about {topic}.",
    "What are common mistakes people make with {topic}?",
    "Write a short paragraph about {topic}.",
    "List five interesting facts about {topic}.",
    "What should I read or practise first to learn about {topic}?",
    "Write a short poem about {topic}.",
    "Answer briefly: why do people care about {topic}?",
    "How does {topic} work? Keep it simple.",
    "Tell me about the history of {topic}.",
    "What are the pros and cons of {topic}?",
    "Write a short story that involves {topic}.",
    "Write a friendly email to a friend about {topic}.",
    "Give a step-by-step guide to getting started with {topic}.",
    "Summarize what everyone should know about {topic} in a few sentences.",
    "What questions do beginners ask about {topic}? Answer two of them.",
    "Can you recommend some resources for learning about {topic}?",
    "Write a haiku about {topic}, then explain its imagery.",
    "Create a quiz with three questions about {topic}, with answers.",
    "Explain {topic} as if I were ten years old.",
    "Write the opening paragraph of a blog post about {topic}.",
    "Tell me a fun fact about {topic} and explain it.",
    "How has {topic} changed over the last fifty years?",
    "Write a dialogue between two friends discussing {topic}.",
    "What are the most important terms to know about {topic}? Define each briefly.",
    "Write a persuasive paragraph encouraging people to learn about {topic}.",
    "Describe a typical day for someone whose job involves {topic}.",
    "What are some myths about {topic}, and what is the truth?",
    "Outline a one-week plan to learn more about {topic}.",
    "Write a limerick about {topic}.",
    "Suggest a catchy title for an article about {topic} and explain why it works.",
    "I am curious about {topic}. Where should I start?",
)


def read_prompts(path: str | Path) -> list[str]:
    """The ``prompt`` field of every line of a JSONL file."""
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def synthetic_prompts(topics_file: str | Path, templates: tuple[str, ...] = PROMPT_TEMPLATES) -> list[str]:
    topics = [line.strip() for line in Path(topics_file).read_text().splitlines() if line.strip()]
    return [template.format(topic=topic) for topic in topics for template in templates]


@dataclass(frozen=True)
class GenerationJob:
    prompt: str
    split: str  # "train" or "heldout"
    prompt_index: int  # index into the run's prompt list of that split
    temperature: float  # 0: greedy
    seed: int


@dataclass(frozen=True)
class Sample:
    """One continuation by the target. Invariant: ``output_ids`` is non-empty."""

    prompt_index: int
    split: str
    temperature: float
    seed: int
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]


def generation_jobs(
    train_prompts: list[str], heldout_prompts: list[str], num_sampled: int, temperature: float, seed: int
) -> list[GenerationJob]:
    """Most useful first (a time budget cuts the tail): held-out greedy, training greedy, then
    ``num_sampled`` rounds of sampled training continuations."""
    jobs = [GenerationJob(p, "heldout", i, 0.0, 0) for i, p in enumerate(heldout_prompts)]
    jobs += [GenerationJob(p, "train", i, 0.0, 0) for i, p in enumerate(train_prompts)]
    for round_ in range(1, num_sampled + 1):
        jobs += [
            GenerationJob(p, "train", i, temperature, seed * 1_000_003 + round_ * 10_007 + i)
            for i, p in enumerate(train_prompts)
        ]
    return jobs


def samples_key(target: LoadedModel, jobs: list[GenerationJob], settings: dict[str, Any]) -> str:
    raw = json.dumps({"target": target.name, "jobs": [asdict(j) for j in jobs], "settings": settings})
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def generate_samples(
    target: LoadedModel, jobs: list[GenerationJob], max_new_tokens: int, max_num_seqs: int, deadline: float | None
) -> tuple[list[Sample], dict[str, Any]]:
    """Run the jobs through the engine, at most ``max_num_seqs`` at once; no job starts after
    ``deadline`` (a time.time() value), running ones finish. Samples come back in job order."""
    prompt_ids = [chat_prompt_ids(target.tokenizer, [{"role": "user", "content": j.prompt}]) for j in jobs]
    block_size = 16
    per_seq_blocks = -(-(max(map(len, prompt_ids), default=1) + max_new_tokens + 1) // block_size) + 1
    engine = LLMEngine(
        EngineConfig(
            cache=CacheConfig(block_size=block_size, num_blocks=max_num_seqs * per_seq_blocks + 4),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=4096),
        ),
        loaded=target,
    )
    start = time.perf_counter()
    outputs: dict[int, tuple[int, ...]] = {}
    request_jobs: dict[str, int] = {}
    next_job = 0
    while next_job < len(jobs) or engine.has_unfinished():
        while (next_job < len(jobs) and len(request_jobs) < max_num_seqs
               and (deadline is None or time.time() < deadline)):
            job = jobs[next_job]
            params = SamplingParams(max_tokens=max_new_tokens, temperature=job.temperature, seed=job.seed)
            request_jobs[engine.add_request(prompt_ids[next_job], params)] = next_job
            next_job += 1
        if not engine.has_unfinished():
            break  # the deadline passed with nothing running
        for out in engine.step():
            if out.finished:
                outputs[request_jobs.pop(out.request_id)] = tuple(out.token_ids)
    samples = [
        Sample(jobs[i].prompt_index, jobs[i].split, jobs[i].temperature, jobs[i].seed, tuple(prompt_ids[i]), outputs[i])
        for i in sorted(outputs) if outputs[i]
    ]
    return samples, generation_stats(samples, len(jobs), time.perf_counter() - start, max_num_seqs, max_new_tokens,
                                     str(target.device))


def generation_stats(samples: list[Sample], num_jobs: int, wall_s: float, max_num_seqs: int, max_new_tokens: int,
                     device: str, num_workers: int = 1) -> dict[str, Any]:
    num_tokens = sum(len(s.output_ids) for s in samples)
    return {
        "num_jobs": num_jobs, "num_samples": len(samples), "complete": len(samples) == num_jobs,
        "num_generated_tokens": num_tokens, "wall_s": round(wall_s, 2),
        "tokens_per_s": round(num_tokens / max(wall_s, 1e-9), 1), "max_num_seqs": max_num_seqs,
        "num_workers": num_workers, "max_new_tokens": max_new_tokens, "device": device,
    }


def write_samples(path: str | Path, key: str, stats: dict[str, Any], samples: list[Sample]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps({"format": SAMPLES_FORMAT, "key": key, "stats": stats}) + "\n")
        for s in samples:
            f.write(json.dumps(asdict(s)) + "\n")
    tmp.replace(path)  # a killed run never leaves a half-written cache behind


def read_samples(path: str | Path, key: str) -> tuple[list[Sample], dict[str, Any]] | None:
    """The cached samples if ``path`` holds those of ``key``, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open() as f:
        header = json.loads(f.readline())
        if header.get("format") != SAMPLES_FORMAT or header.get("key") != key:
            return None
        samples = []
        for line in f:
            raw = json.loads(line)
            raw["prompt_ids"], raw["output_ids"] = tuple(raw["prompt_ids"]), tuple(raw["output_ids"])
            samples.append(Sample(**raw))
    return samples, header["stats"]


@dataclass(frozen=True)
class TeacherSet:
    """The target's view of every sample, for teacher forcing.

    Sequence s is ``prompt + output[:-1]``; its rows ``cu_rows[s] .. cu_rows[s + 1]`` are the
    positions ``loss_starts[s] ..`` (the last prompt token onwards) whose next token is an
    output token: row r's target hidden state and argmax predict output token r - cu_rows[s].
    """

    input_ids: tuple[torch.Tensor, ...]  # per sequence [seq_len] int64, on the CPU
    loss_starts: tuple[int, ...]  # per sequence: position of its first row (num_prompt_tokens - 1)
    cu_rows: tuple[int, ...]  # [num_seqs + 1]
    prompt_index: tuple[int, ...]  # per sequence: the prompt it continues
    hidden: torch.Tensor  # [num_rows, hidden_size] the target's final-norm hidden, target dtype
    top1: torch.Tensor  # [num_rows] int64, the target's argmax
    # per sequence [seq_len, hidden_size]: the target's state at EVERY position (what a feature
    # draft reads); None unless asked for
    states: tuple[torch.Tensor, ...] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.input_ids)

    def rows_of(self, seq: int) -> int:
        return self.cu_rows[seq + 1] - self.cu_rows[seq]


def length_batches(lengths: list[int], max_batch_tokens: int) -> Iterator[list[int]]:
    """Sequence indices grouped by similar length, each group's padded size <= max_batch_tokens
    (a single longer sequence goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    group: list[int] = []
    for i in order:
        if group and (len(group) + 1) * lengths[i] > max_batch_tokens:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


@torch.inference_mode()
def teacher_force(
    target: LoadedModel, samples: list[Sample], max_batch_tokens: int, keep_states: bool = False
) -> TeacherSet:
    """The target over every sample; ``keep_states`` also keeps its state at every position."""
    input_ids = tuple(torch.tensor(s.prompt_ids + s.output_ids[:-1], dtype=torch.int64) for s in samples)
    loss_starts = tuple(len(s.prompt_ids) - 1 for s in samples)
    counts = [len(s.output_ids) for s in samples]
    cu_rows = [0]
    for count in counts:
        cu_rows.append(cu_rows[-1] + count)
    hidden = torch.empty(cu_rows[-1], target.arch.hidden_size, dtype=target.dtype, device=target.device)
    top1 = torch.empty(cu_rows[-1], dtype=torch.int64, device=target.device)
    states: list[torch.Tensor | None] = [None] * len(samples)
    for group in length_batches([len(x) for x in input_ids], max_batch_tokens):
        batch_hidden = causal_hidden(target.model, pad_batch([input_ids[i] for i in group], target.device))
        for row, i in enumerate(group):
            if keep_states:
                states[i] = batch_hidden[row, : len(input_ids[i])].clone()
            rows = batch_hidden[row, loss_starts[i] : loss_starts[i] + counts[i]]
            hidden[cu_rows[i] : cu_rows[i + 1]] = rows
            top1[cu_rows[i] : cu_rows[i + 1]] = target.model.compute_logits(rows).argmax(-1)
    return TeacherSet(input_ids, loss_starts, tuple(cu_rows), tuple(s.prompt_index for s in samples), hidden, top1,
                      tuple(states) if keep_states else None)
