"""What the engine reports back for a request after each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from specserve.config import SpeculationParams


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    text: str  # generated text safe to show so far (all of it once finished)
    token_ids: list[int]  # every generated token so far
    new_token_ids: list[int]  # tokens this step added
    num_prompt_tokens: int
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" once finished
    num_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    new_token_text_ends: list[int] = field(default_factory=list)  # len(text) after each new token
    speculation: SpeculationParams | None = None  # the policy in force (clamped to the server's)
    num_switch_offs: int = 0  # times speculation was switched off for this request
    num_switch_ons: int = 0  # times a probe switched it back on
    num_probe_steps: int = 0  # drafting steps taken while switched off
    num_switched_off_steps: int = 0  # steps decoded without drafts while switched off

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_accepted_length(self) -> float:
        """Accepted draft tokens per step plus one; 0.0 before the first decode step."""
        return 1.0 + self.num_accepted_tokens / self.num_steps if self.num_steps else 0.0


STEP_KINDS = ("prefill", "drafting", "plain")  # every value of StepStats.kind


@dataclass(frozen=True)
class StepStats:
    """Timing of one engine step (host clock; the verify read of accepted tokens syncs the device)."""

    num_seqs: int
    num_tokens: int  # rows the target forward processed (prefill chunks and tree nodes)
    num_draft_tokens: int
    draft_s: float  # proposing trees
    verify_s: float  # target forward + verification (ends with the host read of accepted tokens)
    total_s: float
    gate_open: bool = True  # False: the batch gate kept this decode step plain (``batch_gate``)
    num_prefills: int = 0  # prompt chunks in the step (a one-token chunk counts: a cached prompt's last token)
    eager_forward: bool = False  # with CUDA graphs on: the target's forward fit no bucket and ran eagerly

    @property
    def is_decode(self) -> bool:
        """Only decode trees ran: no prompt chunk, a row per root and per draft."""
        return self.num_prefills == 0 and self.num_tokens == self.num_seqs + self.num_draft_tokens

    @property
    def kind(self) -> str:
        """"prefill" (a prompt chunk rode along), "drafting" (decode only, some tree held a
        draft) or "plain" (decode only, no draft): /metrics' step kinds."""
        return "prefill" if not self.is_decode else "drafting" if self.num_draft_tokens else "plain"
