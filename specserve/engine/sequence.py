"""One request's running state.

Token layout of a sequence (``num_computed`` tokens have K/V in the cache)::

    token_ids   p p p p p p g g g | x
                <-- num_computed -> pending
    p prompt, g generated, x the last sampled token: sampled, not yet cached.

A step feeds the pending tokens to the target: a chain of prompt chunks while prefilling,
then the single pending token as the root of a draft tree. Preemption (recompute) drops the
cache and sets num_computed to 0; token_ids keep everything generated so far.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from specserve.config import SamplingParams, SpeculationParams
from specserve.engine.detokenizer import IncrementalDetokenizer
from specserve.engine.switch_off import SwitchOff
from specserve.engine.token_counts import TokenCounts

NO_SPECULATION = SpeculationParams(enabled=False, max_tree_tokens=0, max_depth=0, drafters=())


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SpecStats:
    """Speculation counters of one request: accepted_per_depth[d] counts accepted drafts at depth d+1."""

    num_steps: int = 0  # decode/verify steps (prefill chunks not counted)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)

    @property
    def mean_accepted_length(self) -> float:
        """Accepted draft tokens per step, plus one (the bonus token): 1.0 without speculation."""
        return 1.0 + self.num_accepted_tokens / self.num_steps if self.num_steps else 0.0

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_steps += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        while len(self.accepted_per_depth) < num_accepted:
            self.accepted_per_depth.append(0)
        for depth in range(num_accepted):
            self.accepted_per_depth[depth] += 1


@dataclass
class Sequence:
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    arrival_time: float
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    spec: SpecStats = field(default_factory=SpecStats)
    first_token_time: float | None = None
    speculation: SpeculationParams = NO_SPECULATION  # resolved: every field set, within the server's
    switch_off: SwitchOff | None = None  # None: never switched off (no drafter or no cost curve)
    token_counts: TokenCounts | None = None  # set when params.uses_history

    @property
    def num_draft_slots(self) -> int:
        """Draft nodes the next decode step may verify for this sequence (its tree minus the root)."""
        if not self.speculation.enabled:
            return 0
        if self.switch_off is not None and not self.switch_off.wants_drafts():
            return 0
        return self.speculation.max_tree_tokens

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_pending > 1

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - self.num_generated
