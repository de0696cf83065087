"""Latency arithmetic for the benchmarks: pure functions over recorded times and counts.

No clocks, no devices, no I/O here; the harnesses record, this module computes. The same
definitions serve ``bench.latency`` (engine level) and ``bench.serve`` (HTTP level).

A request's *timeline* is its submit time and one *observation* (time, num_tokens) per moment
new tokens reached the caller: an engine step that gave the request tokens, a transformers
streamer call, an SSE chunk that carried text. With speculation one observation can carry
several tokens. For a request of n generated tokens, times t_0 (submit), t_1 < ... < t_K::

    TTFT           t_1 - t_0
    E2E            t_K - t_0  (bench.serve: until [DONE] arrived, just after the last chunk)
    TPOT           (E2E - TTFT) / (n - 1), = (t_K - t_1) / (n - 1); undefined when n < 2
    ITL            t_k - t_(k-1) for k = 2..K: one gap per observation, however many tokens it carried
    token latency  the observation at t_k (k >= 2) carrying m_k tokens gives m_k tokens a latency of
                   (t_k - t_(k-1)) / m_k each, so every token after the first observation counts
                   once; its mean over tokens is sum(t_K - t_1) / sum(n - m_1) (= token-weighted
                   TPOT when the first observation carries one token, as after a prefill)

Speculation, counted over verification steps (a step verifies one draft tree and adds the
accepted drafts plus one bonus token; prefill steps are not verification steps)::

    accepted length         tokens one verification step added = accepted drafts + 1
    mean accepted length    1 + accepted drafts / steps, over all steps of all requests
    acceptance at depth d   fraction of steps that accepted >= d drafts (d = 1, 2, ...)

Throughput and comparison::

    tokens/s   generated tokens / wall seconds spent generating them
    speedup    tokens/s of a method / tokens/s of the baseline, same prompts, same run
    goodput    requests that met every given SLO / benchmark duration (an undefined TPOT meets
               a TPOT SLO: there was no second token to wait for)

Percentiles are nearest-rank: p_q is the smallest value with at least q of the values <= it.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SLO_NAMES = ("ttft", "tpot", "e2e")


# ---- summaries ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least a fraction q of the values <= it."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 1:
        raise ValueError(f"q must lie in [0, 1], not {q}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(round(q * len(ordered), 9)) - 1)]


def summarise(values: Iterable[float]) -> dict[str, float]:
    """mean, p50, p90, p99, min, max of a non-empty list of numbers (nearest-rank percentiles)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("summarise needs at least one value")
    return {
        "mean": statistics.fmean(ordered),
        "p50": percentile(ordered, 0.50),
        "p90": percentile(ordered, 0.90),
        "p99": percentile(ordered, 0.99),
        "min": ordered[0],
        "max": ordered[-1],
    }


def summary_or_none(values: Iterable[float | None], scale: float = 1.0) -> dict[str, float] | None:
    """``summarise`` of the defined values times ``scale`` (1000: seconds to ms); None if none."""
    kept = [v * scale for v in values if v is not None]
    return summarise(kept) if kept else None


# ---- one request's timeline --------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """When one request's tokens arrived: submit time, then one (time, num_tokens) per observation."""

    start: float
    times: tuple[float, ...]  # [num_observations] increasing, each >= start
    num_tokens: tuple[int, ...]  # [num_observations] tokens each observation carried, each >= 1

    def __post_init__(self) -> None:
        if not self.times or len(self.times) != len(self.num_tokens):
            raise ValueError("a timeline needs one token count per observation, and at least one")
        if any(m < 1 for m in self.num_tokens):
            raise ValueError("every observation carries at least one token")
        if self.times[0] < self.start or any(b < a for a, b in zip(self.times, self.times[1:])):
            raise ValueError("observation times must not go back in time")

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def ttft(self) -> float:
        return self.times[0] - self.start

    def e2e(self) -> float:
        return self.times[-1] - self.start

    def tpot(self, num_tokens: int | None = None) -> float | None:
        """(last - first observation) / (n - 1); n defaults to the tokens observed."""
        n = self.total_tokens if num_tokens is None else num_tokens
        return (self.times[-1] - self.times[0]) / (n - 1) if n >= 2 else None

    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]

    def token_latencies(self) -> list[float]:
        """One value per token after the first observation: its observation's gap / tokens carried."""
        latencies = []
        for gap, m in zip(self.itl(), self.num_tokens[1:]):
            latencies += [gap / m] * m
        return latencies


def stream_figures(text_times: Sequence[float], e2e_s: float,
                   num_tokens: int) -> tuple[float | None, float | None, list[float]]:
    """(TTFT, TPOT, ITLs) of one streamed answer, as ``bench.serve`` measures it.

    ``text_times``: arrival of every chunk that carried text, seconds after the send (increasing);
    ``e2e_s``: when [DONE] arrived; ``num_tokens``: the tokens the answer holds (the server's
    usage). TTFT is None when no chunk carried text, TPOT when n < 2 or there is no TTFT.
    """
    if any(b < a for a, b in zip(text_times, text_times[1:])) or (text_times and text_times[-1] > e2e_s):
        raise ValueError("chunk times must increase and come before [DONE]")
    ttft = text_times[0] if text_times else None
    tpot = (e2e_s - ttft) / (num_tokens - 1) if ttft is not None and num_tokens >= 2 else None
    return ttft, tpot, [b - a for a, b in zip(text_times, text_times[1:])]


def truncate_observations(times: Sequence[float], num_tokens: Sequence[int], n: int) -> tuple[list[float], list[int]]:
    """The observations that delivered the first n tokens (the last one cut to what it added)."""
    kept_times, kept_counts, total = [], [], 0
    for t, m in zip(times, num_tokens):
        if total >= n:
            break
        take = min(m, n - total)
        kept_times.append(t)
        kept_counts.append(take)
        total += take
    if total < n:
        raise ValueError(f"the observations carry {total} tokens, fewer than {n}")
    return kept_times, kept_counts


def mean_token_latency(timelines: Iterable[Timeline]) -> float | None:
    """Token-weighted mean of the token latencies of many requests (None: no token after a first)."""
    total_s, total_tokens = 0.0, 0
    for t in timelines:
        total_s += t.times[-1] - t.times[0]
        total_tokens += t.total_tokens - t.num_tokens[0]
    return total_s / total_tokens if total_tokens else None


# ---- speculation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acceptance:
    """Verification-step counters: accepted_per_depth[d] = steps that accepted >= d + 1 drafts."""

    num_steps: int = 0
    num_accepted_tokens: int = 0  # accepted drafts, bonus tokens not counted
    accepted_per_depth: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        counts = self.accepted_per_depth
        if any(b > a for a, b in zip(counts, counts[1:])) or (counts and counts[0] > self.num_steps):
            raise ValueError("accepted_per_depth must not increase with depth nor exceed num_steps")
        if sum(counts) != self.num_accepted_tokens:
            raise ValueError("accepted_per_depth must sum to num_accepted_tokens")

    @classmethod
    def from_step_sizes(cls, tokens_per_step: Iterable[int]) -> Acceptance:
        """From the tokens each verification step added (accepted drafts + 1)."""
        sizes = list(tokens_per_step)
        if any(s < 1 for s in sizes):
            raise ValueError("a verification step adds at least one token")
        depth = max(sizes, default=1) - 1
        per_depth = tuple(sum(1 for s in sizes if s - 1 >= d) for d in range(1, depth + 1))
        return cls(len(sizes), sum(sizes) - len(sizes), per_depth)

    def __add__(self, other: Acceptance) -> Acceptance:
        depth = max(len(self.accepted_per_depth), len(other.accepted_per_depth))
        a = self.accepted_per_depth + (0,) * (depth - len(self.accepted_per_depth))
        b = other.accepted_per_depth + (0,) * (depth - len(other.accepted_per_depth))
        return Acceptance(self.num_steps + other.num_steps, self.num_accepted_tokens + other.num_accepted_tokens,
                          tuple(x + y for x, y in zip(a, b)))

    @property
    def mean_accepted_length(self) -> float | None:
        return 1.0 + self.num_accepted_tokens / self.num_steps if self.num_steps else None

    @property
    def rate_per_depth(self) -> list[float]:
        """[d - 1]: fraction of steps that accepted >= d drafts."""
        return [c / self.num_steps for c in self.accepted_per_depth] if self.num_steps else []

    @property
    def length_histogram(self) -> list[int]:
        """[L - 1]: steps whose accepted length (drafts accepted + 1) was exactly L."""
        at_least = [self.num_steps, *self.accepted_per_depth, 0]
        return [at_least[d] - at_least[d + 1] for d in range(len(at_least) - 1)]


# ---- throughput, speedup, SLOs -----------------------------------------------------------------


def throughput(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


def speedup(baseline_tokens_per_s: float | None, tokens_per_s: float | None) -> float | None:
    """How many times faster than the baseline (ratio of tokens/s); None if either is missing."""
    if not baseline_tokens_per_s or tokens_per_s is None:
        return None
    return tokens_per_s / baseline_tokens_per_s


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` (milliseconds) -> {"ttft": 200.0, "tpot": 50.0}."""
    slos: dict[str, float] = {}
    for item in items:
        for part in item.replace(",", " ").split():
            name, sep, value = part.partition(":")
            if not sep or name not in SLO_NAMES:
                raise ValueError(f"bad SLO {part!r}: write NAME:MS with NAME one of {', '.join(SLO_NAMES)}, e.g. ttft:200")
            try:
                slos[name] = float(value)
            except ValueError:
                raise ValueError(f"bad SLO {part!r}: {value!r} is not a number of milliseconds") from None
            if slos[name] <= 0:
                raise ValueError(f"bad SLO {part!r}: the limit must be positive")
    return slos


def meets_slos(slos: dict[str, float], ttft_s: float | None, tpot_s: float | None, e2e_s: float | None) -> bool:
    """Whether one request met every given SLO (limits in ms, figures in s)."""
    figures = {"ttft": ttft_s, "tpot": tpot_s, "e2e": e2e_s}
    for name, limit_ms in slos.items():
        value = figures[name]
        if value is None:
            if name == "tpot":  # fewer than two tokens: no time per output token to exceed
                continue
            return False
        if value * 1000 > limit_ms:
            return False
    return True


def goodput(slos: dict[str, float], requests: Iterable[tuple[float | None, float | None, float | None]],
            duration_s: float) -> float | None:
    """Requests per second that met every SLO; ``requests`` are (ttft_s, tpot_s, e2e_s) of successes."""
    good = sum(meets_slos(slos, *figures) for figures in requests)
    return throughput(good, duration_s)


# ---- arrivals ----------------------------------------------------------------------------------


def arrival_offsets(num_requests: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times in seconds from the start: the first at 0, then gamma-distributed gaps.

    The gaps have mean 1/rate and shape ``burstiness`` (1: a Poisson process; < 1 burstier,
    > 1 more regular), as in vLLM's benchmark_serving. rate inf sends everything at once.
    """
    if rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be positive")
    if math.isinf(rate):
        return [0.0] * num_requests
    scale = 1.0 / (rate * burstiness)
    offsets, now = [], 0.0
    for i in range(num_requests):
        if i:
            now += rng.gammavariate(burstiness, scale)
        offsets.append(now)
    return offsets
