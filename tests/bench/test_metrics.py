"""The metric arithmetic of bench/metrics.py on synthetic timings, with exact expected values."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from bench.metrics import (
    Acceptance,
    Timeline,
    arrival_offsets,
    goodput,
    mean_token_latency,
    meets_slos,
    parse_slos,
    percentile,
    speedup,
    stream_figures,
    summarise,
    summary_or_none,
    throughput,
    truncate_observations,
)
from specserve.engine.sequence import SpecStats


def test_nearest_rank_percentiles():
    values = [7, 1, 10, 3, 5, 2, 9, 4, 8, 6]  # 1..10 shuffled
    assert [percentile(values, q) for q in (0, 0.1, 0.5, 0.9, 0.99, 1)] == [1, 1, 5, 9, 10, 10]
    assert percentile([3, 1, 2], 0.5) == 2
    assert percentile([4.0], 0.9) == 4.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_summarise_and_scaling():
    assert summarise([4, 1, 3, 2]) == {"mean": 2.5, "p50": 2, "p90": 4, "p99": 4, "min": 1, "max": 4}
    assert summary_or_none([0.25, None, 0.5], 1000) == {"mean": 375.0, "p50": 250.0, "p90": 500.0, "p99": 500.0,
                                                        "min": 250.0, "max": 500.0}
    assert summary_or_none([None]) is None
    assert summary_or_none([]) is None


def test_timeline_figures():
    # submitted at 10.0; first token at 11.0; then 1 token, 2 tokens (one speculative step), 1 token
    t = Timeline(10.0, (11.0, 11.5, 12.5, 12.75), (1, 1, 2, 1))
    assert t.total_tokens == 5
    assert t.ttft() == 1.0
    assert t.e2e() == 2.75
    assert t.tpot() == (12.75 - 11.0) / 4 == 0.4375
    assert t.tpot(num_tokens=8) == 0.25  # n from elsewhere (a server's usage)
    assert t.itl() == [0.5, 1.0, 0.25]
    assert t.token_latencies() == [0.5, 0.5, 0.5, 0.25]
    assert statistics.fmean(t.token_latencies()) == t.tpot()  # first observation carried one token


def test_single_token_and_bad_timelines():
    one = Timeline(0.0, (0.5,), (1,))
    assert (one.ttft(), one.e2e(), one.tpot(), one.itl(), one.token_latencies()) == (0.5, 0.5, None, [], [])
    with pytest.raises(ValueError):
        Timeline(0.0, (), ())
    with pytest.raises(ValueError):
        Timeline(0.0, (1.0, 0.5), (1, 1))  # back in time
    with pytest.raises(ValueError):
        Timeline(0.0, (1.0,), (0,))
    with pytest.raises(ValueError):
        Timeline(2.0, (1.0,), (1,))  # before the submit


def test_mean_token_latency_weights_tokens():
    a = Timeline(0.0, (1.0, 2.0), (1, 1))  # 1 s over 1 token
    b = Timeline(0.0, (1.0, 1.5, 2.0), (1, 2, 2))  # 1 s over 4 tokens
    assert mean_token_latency([a, b]) == 2.0 / 5
    assert statistics.fmean(a.token_latencies() + b.token_latencies()) == 2.0 / 5
    assert mean_token_latency([Timeline(0.0, (1.0,), (1,))]) is None


def test_truncate_observations():
    assert truncate_observations([1.0, 2.0, 3.0], [1, 3, 2], 3) == ([1.0, 2.0], [1, 2])
    assert truncate_observations([1.0, 2.0, 3.0], [1, 3, 2], 6) == ([1.0, 2.0, 3.0], [1, 3, 2])
    with pytest.raises(ValueError):
        truncate_observations([1.0], [2], 3)


def test_acceptance_from_step_sizes():
    a = Acceptance.from_step_sizes([1, 3, 2, 1, 4])  # tokens per verification step
    assert (a.num_steps, a.num_accepted_tokens, a.accepted_per_depth) == (5, 6, (3, 2, 1))
    assert a.mean_accepted_length == 1 + 6 / 5
    assert a.rate_per_depth == [3 / 5, 2 / 5, 1 / 5]
    assert a.length_histogram == [2, 1, 1, 1]  # two steps of length 1, one each of 2, 3, 4
    total = a + Acceptance(2, 1, (1,))
    assert (total.num_steps, total.num_accepted_tokens, total.accepted_per_depth) == (7, 7, (4, 2, 1))
    assert total.length_histogram == [3, 2, 1, 1]
    plain = Acceptance.from_step_sizes([1, 1, 1])
    assert (plain.mean_accepted_length, plain.rate_per_depth, plain.length_histogram) == (1.0, [], [3])
    empty = Acceptance()
    assert (empty.mean_accepted_length, empty.rate_per_depth, empty.length_histogram) == (None, [], [0])
    with pytest.raises(ValueError):
        Acceptance(2, 3, (1, 2))  # deeper counts cannot exceed shallower ones


def test_acceptance_agrees_with_the_engine_counters():
    """Our per-depth definition is the engine's: SpecStats.record over the same steps."""
    accepted = [0, 2, 1, 0, 3, 3, 1]
    stats = SpecStats()
    for n in accepted:
        stats.record(num_drafts=6, num_accepted=n)
    a = Acceptance.from_step_sizes([n + 1 for n in accepted])
    assert a == Acceptance(stats.num_steps, stats.num_accepted_tokens, tuple(stats.accepted_per_depth))
    assert a.mean_accepted_length == stats.mean_accepted_length


def test_throughput_and_speedup():
    assert throughput(256, 8.0) == 32.0
    assert throughput(5, 0.0) is None
    assert speedup(20.0, 50.0) == 2.5  # tokens/s of the method over tokens/s of the baseline
    assert speedup(40.0, 20.0) == 0.5
    assert speedup(None, 20.0) is None and speedup(0.0, 20.0) is None and speedup(20.0, None) is None


def test_parse_slos():
    assert parse_slos(["ttft:200", "tpot:50"]) == {"ttft": 200.0, "tpot": 50.0}
    assert parse_slos(["ttft:200,e2e:1500.5"]) == {"ttft": 200.0, "e2e": 1500.5}
    assert parse_slos([]) == {}
    for bad in (["latency:5"], ["ttft"], ["ttft:fast"], ["tpot:0"]):
        with pytest.raises(ValueError):
            parse_slos(bad)


def test_goodput_counts_requests_meeting_every_slo():
    slos = {"ttft": 200.0, "tpot": 50.0}
    requests = [
        (0.100, 0.040, 5.0),  # good
        (0.250, 0.040, 5.0),  # TTFT too slow
        (0.100, 0.060, 5.0),  # TPOT too slow
        (0.200, 0.050, 9.0),  # exactly at both limits: good
        (0.150, None, 0.2),  # one token: no TPOT to miss
        (None, 0.010, 1.0),  # no text ever: misses the TTFT SLO
    ]
    assert [meets_slos(slos, *r) for r in requests] == [True, False, False, True, True, False]
    assert goodput(slos, requests, duration_s=2.0) == 1.5
    assert goodput({"e2e": 4000.0}, requests, duration_s=4.0) == 0.5  # 0.2 s and 1.0 s
    assert goodput({}, requests, duration_s=3.0) == 2.0  # no SLO: every completed request counts


def test_arrival_offsets():
    assert arrival_offsets(4, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0, 0.0]
    offsets = arrival_offsets(20001, 4.0, 1.0, random.Random(1))
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0 and min(gaps) >= 0
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.03)  # mean 1 / rate
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.05)  # Poisson: stdev = mean
    regular = arrival_offsets(5, 2.0, 1e8, random.Random(2))  # huge shape: nearly constant gaps
    assert regular == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0], abs=2e-3)
    assert arrival_offsets(6, 3.0, 0.5, random.Random(7)) == arrival_offsets(6, 3.0, 0.5, random.Random(7))
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0, 1.0, random.Random(0))


def test_stream_figures():
    # text at 0.25, 0.5, 1.0, 1.25 s after the send, [DONE] at 1.5 s, 6 tokens (usage)
    ttft, tpot, itl = stream_figures([0.25, 0.5, 1.0, 1.25], 1.5, 6)
    assert (ttft, tpot, itl) == (0.25, 0.25, [0.25, 0.5, 0.25])  # TPOT = (1.5 - 0.25) / 5
    assert stream_figures([0.5], 0.75, 1) == (0.5, None, [])  # one token: no TPOT
    assert stream_figures([], 0.75, 3) == (None, None, [])  # no text ever arrived
    assert Timeline(0.0, (0.25, 0.5, 1.0, 1.5), (1, 2, 1, 2)).tpot() == stream_figures([0.25, 0.5, 1.0, 1.5], 1.5, 6)[1]
    for times, done in (([0.5, 0.25], 1.0), ([0.5, 1.25], 1.0)):  # back in time; text after [DONE]
        with pytest.raises(ValueError):
            stream_figures(times, done, 3)
