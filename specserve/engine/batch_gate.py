"""Engine-wide speculation gate: a decode step drafts only while drafting measurably pays at the
current batch size.

The per-request switch-off (``switch_off.py``) judges each request by the device's calibrated
cost of a forward. As the batch grows the forward stops being the whole story: proposing,
packing, verifying and committing trees for every sequence is host work the forward's cost
curve does not see, and verification stops being nearly free. The gate therefore measures
whole decode steps (wall time, from the start of scheduling to the last commit), per batch
bucket b = the number of decoding sequences rounded up to a power of two::

    drafting s/token = EMA over drafting steps at b of  step seconds / tokens produced
    plain s/token    = EMA over plain steps at b    of  step seconds / sequences

A plain step is one in which no tree held a draft: the gate was closed, every request was
switched off, or the drafters found nothing. At bucket b, with n the bucket's step counter:

- fewer than ``MIN_SAMPLES`` steps of either kind seen: alternate, drafting on odd steps and
  plain on even ones, so both rates are known after about ``2 * MIN_SAMPLES`` steps (a serving
  engine's batch keeps changing size; a gate that learnt only through rare probes spent
  hundreds of steps drafting at a loss first: 0.64x of speculation off at 16 concurrent
  requests on the H200, before this rule);
- drafting s/token x (1 + ``MARGIN``) <= plain s/token: draft, with a plain probe every ``REFRESH * interval``
  steps to keep the plain rate current;
- else: plain, with drafting probes so that the gate opens again when the workload changes: the
  first ``interval`` steps after the last step the gate let draft at this bucket, then twice as far apart after each
  probe, up to ``MAX_BACKOFF * interval`` (a drafting step at a losing batch size can cost
  twice a plain one: at 16 in flight on the H200 the n-gram engine's p90 inter-token latency was
  6.0 ms against off's 3.3, its median the same; a probe every 32nd step would then cost about
  4% of throughput, a probe every 256th about 0.5%); a probe whose own
  step beat the plain rate brings the next one back to ``interval`` steps, so a workload that
  turned favourable reopens the gate within a few probes.

Drafting must win by ``MARGIN`` because it also costs what the step rates do not see: requests
that draft finish at different steps, so new prompts join in many small prompt-carrying steps
rather than a few full ones (at 32 in flight on the H200 the n-gram server ran 172 of them
against off's 31, 2.6 s against 0.5 s of a 10 s run), while its drafting steps beat its plain
ones by only 11% a token (0.123 against 0.137 ms): the run was 0.89x of speculation off. Steps
that carry a prompt (not measured) draft only once drafting is measured to win.

Below ``MIN_BATCH`` sequences the gate stays open and records nothing: a small batch's trees
ride along in a forward that costs about what one token's does (on a GPU), and the
per-request switch-off, from the calibrated cost curve, already turns losing requests off.
The gate is about load.

Invariant: the gate never changes what a request generates under greedy decoding, only how
fast; requests whose text depends on which trees are verified (seeded sampling) are never
gated (the engine passes only switch-off-eligible requests through it).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_BATCH = 8  # decoding sequences from which on the gate decides
MIN_SAMPLES = 4  # steps of a kind before its rate is trusted
REFRESH = 4  # while drafting wins, a plain probe every REFRESH * interval steps
EMA_WEIGHT = 0.2  # weight of the newest step in a rate
MARGIN = 0.1  # drafting wins when its seconds per token x (1 + MARGIN) <= the plain rate
MAX_BACKOFF = 8  # a closed bucket's probes at most MAX_BACKOFF * interval steps apart


def batch_bucket(num_seqs: int) -> int:
    """The smallest power of two >= num_seqs (>= 1)."""
    return 1 << max(0, num_seqs - 1).bit_length()


@dataclass
class BucketRates:
    """Measured seconds per token at one batch bucket (None before the first step of a kind)."""

    drafting_s: float | None = None
    plain_s: float | None = None
    num_drafting: int = 0
    num_plain: int = 0
    num_steps: int = 0  # steps the gate decided at this bucket
    last_drafted: int = 0  # the last of those steps the gate let draft
    probe_every: int = 0  # steps from that one to the next drafting probe while closed (0: interval)

    @property
    def drafting_wins(self) -> bool:
        """Both rates known and drafting's, with ``MARGIN``, at most the plain one."""
        return self.drafting_s is not None and self.plain_s is not None and _wins(self.drafting_s, self.plain_s)

    def add(self, drafted: bool, seconds_per_token: float) -> None:
        if drafted:
            if self.plain_s is not None and _wins(seconds_per_token, self.plain_s):
                self.probe_every = 0  # this drafting step paid: probe again soon
            self.drafting_s = _ema(self.drafting_s, seconds_per_token)
            self.num_drafting += 1
        else:
            self.plain_s = _ema(self.plain_s, seconds_per_token)
            self.num_plain += 1


def _wins(drafting_s: float, plain_s: float) -> bool:
    """Drafting's seconds per token beat the plain rate by ``MARGIN``."""
    return drafting_s * (1 + MARGIN) <= plain_s


def _ema(rate: float | None, value: float) -> float:
    return value if rate is None else (1 - EMA_WEIGHT) * rate + EMA_WEIGHT * value


class BatchGate:
    """Whether the next decode step may draft, from the measured rates of earlier steps."""

    def __init__(self, interval: int) -> None:
        if interval < 2:
            raise ValueError(f"the gate's probe interval must be at least 2, not {interval}")
        self.interval = interval
        self.rates: dict[int, BucketRates] = {}
        self.num_closed_steps = 0  # steps the gate kept plain (probes included)

    def allows_drafting(self, num_seqs: int, decide: bool = True) -> bool:
        """Decide the next decode step of ``num_seqs`` sequences (call once per step).
        ``decide`` False (a step that also prefills, which the engine does not measure): no
        probe and no count, only the measured verdict (drafting once it is known to win)."""
        if num_seqs < MIN_BATCH:
            return True
        if not decide:
            return self.drafting_pays(num_seqs) is True
        rates = self.rates.setdefault(batch_bucket(num_seqs), BucketRates())
        rates.num_steps += 1
        if min(rates.num_plain, rates.num_drafting) < MIN_SAMPLES:
            allowed = rates.num_steps % 2 == 1  # learning: alternate, so both rates are known fast
        elif rates.drafting_wins:
            allowed = rates.num_steps % (REFRESH * self.interval) != 0
            rates.probe_every = 0
        else:  # closed: probe, backing off while probes keep losing
            every = rates.probe_every or self.interval
            allowed = rates.num_steps - rates.last_drafted >= every
            if allowed:
                rates.probe_every = min(MAX_BACKOFF * self.interval, 2 * every)
        if allowed:
            rates.last_drafted = rates.num_steps
        self.num_closed_steps += not allowed
        return allowed

    def record(self, num_seqs: int, seconds: float, num_tokens: int, drafted: bool) -> None:
        """A decode-only step of ``num_seqs`` sequences took ``seconds`` and produced ``num_tokens``
        tokens; ``drafted``: some tree held a draft."""
        if num_seqs < MIN_BATCH or num_tokens < 1:
            return
        self.rates.setdefault(batch_bucket(num_seqs), BucketRates()).add(drafted, seconds / num_tokens)

    def drafting_pays(self, num_seqs: int) -> bool | None:
        """Whether drafting wins (by ``MARGIN``) at this batch size, as measured; None until both
        rates are trusted."""
        rates = self.rates.get(batch_bucket(num_seqs))
        if rates is None or min(rates.num_plain, rates.num_drafting) < MIN_SAMPLES:
            return None
        return rates.drafting_wins
