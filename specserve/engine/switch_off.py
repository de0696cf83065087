"""Per-request speculation switch-off: stop drafting for a request that speculation slows down.

A step that verifies a tree of T drafts for a request, in a forward of n other rows, costs the
request ``draft_s + cost(n + 1 + T)`` seconds and gives it ``1 + a`` tokens (a accepted); the
same step without drafts would cost ``cost(n + 1)`` for one token (``cost``: the device's
measured ``StepCost``). Over the request's last ``window`` drafting steps::

    speculative s/token = sum(draft_s_i + cost(n_i + 1 + T_i)) / tokens
    plain s/token       = sum(cost(n_i + 1)) / number of steps

where ``tokens`` is the steps' own ``sum(1 + a_i)``, shrunk towards the engine-wide rate: with
an ``AcceptancePrior`` of mean m tokens per drafting step (over every request's recent steps),
k = ``PRIOR_STEPS`` pseudo-steps of m tokens each join the request's steps::

    tokens = (sum(1 + a_i) + k * m) * len(steps) / (len(steps) + k)

so a few unlucky steps do not switch off a request whose drafter does well elsewhere, while a
drafter that does badly everywhere (an engine-wide m near 1) switches requests off at once.
Once at least half a window is seen (the prior's k pseudo-steps count) and speculative >
plain, the request stops drafting (switch-off). While off, every ``interval`` plain steps one
step drafts again (a probe); a probe whose speculative s/token (with the prior) beats plain
switches drafting back on (switch-on, the window restarts from the probe), a failed one doubles
the interval (at most 8x the base). Steps whose drafter proposed nothing cost nothing extra and
are not counted.

While the drafters lose over the engine's recent drafting steps taken together (at least a
window of them), a new request starts switched off: it probes in its first step, then at the
longest interval, and the probes keep watch for a workload on which drafting pays again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specserve.engine.calibration import StepCost

MAX_INTERVAL_FACTOR = 8
PRIOR_STEPS = 2  # k: weight of the engine-wide rate, in drafting steps
PRIOR_HISTORY = 256  # drafting steps (of all requests) the engine-wide rate is taken over


@dataclass(frozen=True)
class DraftStep:
    """One step of one request that verified drafts."""

    num_drafts: int  # T: draft nodes verified (the root not counted)
    num_accepted: int  # a: drafts accepted
    num_other_tokens: int  # n: rows of the other sequences in the same forward
    draft_s: float  # this request's share of the step's drafting time

    def seconds(self, cost: StepCost) -> tuple[float, float]:
        """(speculative seconds, plain seconds) of this step for the request."""
        return self.draft_s + cost(self.num_other_tokens + 1 + self.num_drafts), cost(self.num_other_tokens + 1)


class AcceptancePrior:
    """The engine's last ``PRIOR_HISTORY`` drafting steps of every request (with one set of
    drafters): their mean tokens per step (1 + accepted drafts; None before the first), and
    whether speculation pays over them as a whole.

    Invariant: once ``pays`` has seen a cost curve, ``recent_seconds`` holds every step of
    ``recent``'s (speculative, plain) seconds under it, in order (each step costed once when
    added: ``pays``, called for every new request, sums them instead of costing 256 steps).
    """

    def __init__(self) -> None:
        self.recent: deque[DraftStep] = deque(maxlen=PRIOR_HISTORY)
        self.num_tokens = 0  # sum(1 + num_accepted) over ``recent`` (read every step: kept, not summed)
        self.cost: StepCost | None = None  # the curve ``recent_seconds`` is costed under (None: not yet)
        self.recent_seconds: deque[tuple[float, float]] = deque(maxlen=PRIOR_HISTORY)

    def add(self, step: DraftStep) -> None:
        if len(self.recent) == PRIOR_HISTORY:
            self.num_tokens -= 1 + self.recent[0].num_accepted
        self.recent.append(step)
        self.num_tokens += 1 + step.num_accepted
        if self.cost is not None:
            self.recent_seconds.append(step.seconds(self.cost))

    @property
    def mean(self) -> float | None:
        return self.num_tokens / len(self.recent) if self.recent else None

    def pays(self, cost: StepCost, min_steps: int) -> bool:
        """False only once ``min_steps`` steps are known and speculation lost over them
        (``speculation_pays`` over ``recent``, the same sums in the same order)."""
        if len(self.recent) < min_steps:
            return True
        if cost != self.cost:
            self.cost = cost
            self.recent_seconds = deque((step.seconds(cost) for step in self.recent), maxlen=PRIOR_HISTORY)
        return _pays(list(self.recent_seconds), self.num_tokens, None)


def speculation_pays(steps: list[DraftStep], cost: StepCost, prior: float | None = None) -> bool:
    """Speculative seconds per token <= plain seconds per token over ``steps`` (non-empty),
    the steps' tokens shrunk towards ``prior`` tokens per step (None: the steps alone)."""
    return _pays([step.seconds(cost) for step in steps], sum(1 + step.num_accepted for step in steps), prior)


def _pays(seconds: list[tuple[float, float]], num_tokens: float, prior: float | None) -> bool:
    """``speculation_pays`` from the steps' (speculative, plain) seconds and their tokens."""
    num_steps = len(seconds)
    if prior is not None:
        num_tokens = (num_tokens + PRIOR_STEPS * prior) * num_steps / (num_steps + PRIOR_STEPS)
    return sum(spec for spec, _ in seconds) / num_tokens <= sum(plain for _, plain in seconds) / num_steps


@dataclass
class SwitchOff:
    """One request's switch-off state. Invariant: ``recent`` holds drafting steps taken while on
    (or the probe that switched it on), at most ``window`` of them; ``recent_seconds`` their
    (speculative, plain) seconds, each step costed once (a decision reads the whole window)."""

    window: int
    base_interval: int
    off: bool = False
    interval: int = 0  # plain steps between probes while off
    plain_steps_since_probe: int = 0
    recent: deque[DraftStep] = field(default_factory=deque)
    recent_seconds: deque[tuple[float, float]] = field(default_factory=deque)
    num_switch_offs: int = 0
    num_switch_ons: int = 0
    num_probes: int = 0
    num_off_steps: int = 0  # steps run without drafts because the request was switched off

    def __post_init__(self) -> None:
        self.interval = self.base_interval

    @classmethod
    def starting_off(cls, window: int, base_interval: int) -> SwitchOff:
        """A request that starts switched off (the engine does so while its drafters lose over
        every request's recent steps), counted as a switch-off: it probes at once, then every
        ``MAX_INTERVAL_FACTOR`` * base steps. The first probe keeps the engine's record fresh,
        so a workload that drafting suits again is seen even when every request is short."""
        state = cls(window, base_interval, off=True, num_switch_offs=1)
        state.interval = state.plain_steps_since_probe = MAX_INTERVAL_FACTOR * base_interval
        return state

    def wants_drafts(self) -> bool:
        """Whether the request drafts in the next step (on, or off with a probe due)."""
        return not self.off or self.plain_steps_since_probe >= self.interval

    def record(self, step: DraftStep | None, cost: StepCost, prior: float | None = None) -> None:
        """After a decode step: ``step`` is None when no drafts were verified for the request;
        ``prior``: the engine-wide tokens per drafting step (``AcceptancePrior.mean``)."""
        if step is None:
            if self.off:
                self.num_off_steps += 1
                self.plain_steps_since_probe += 1
            return
        seconds = step.seconds(cost)
        if self.off:
            self.num_probes += 1
            self.plain_steps_since_probe = 0
            if _pays([seconds], 1 + step.num_accepted, prior):
                self.off, self.interval = False, self.base_interval
                self.recent, self.recent_seconds = deque([step]), deque([seconds])
                self.num_switch_ons += 1
            else:
                self.interval = min(2 * self.interval, MAX_INTERVAL_FACTOR * self.base_interval)
            return
        self.recent.append(step)
        self.recent_seconds.append(seconds)
        if len(self.recent) > self.window:
            self.recent.popleft()
            self.recent_seconds.popleft()
        seen = len(self.recent) + (PRIOR_STEPS if prior is not None else 0)
        if 2 * seen >= self.window and not _pays(list(self.recent_seconds),
                                                  sum(1 + s.num_accepted for s in self.recent), prior):
            self.off = True
            self.plain_steps_since_probe = 0
            self.recent.clear()
            self.recent_seconds.clear()
            self.num_switch_offs += 1
