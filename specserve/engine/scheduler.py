"""Continuous batching: which sequences run this step, with how many tokens, in which slots.

Each step every running sequence gets either its next prefill chunk (a chain of prompt
tokens) or, once decoding, slots for a tree of 1 + ``seq.num_draft_slots`` tokens (its own
speculation policy's budget, 0 while it does not draft). Waiting
requests join as long as the token budget, ``max_num_seqs`` and the KV pool allow (unless the
admission hold, ``SchedulerConfig.prefill_hold_steps``, keeps them waiting a few steps to join
together: each step that carries a prompt costs the running batch a slower step). When the
pool runs dry the most recently admitted sequence is preempted (its blocks released, to be
recomputed later: the request keeps every token it generated).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from specserve.cache.kv_cache_manager import KVCacheManager, NoFreeBlocks
from specserve.config import SchedulerConfig
from specserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_slots: int  # new tokens this step may write (prefill chunk length or tree budget)
    is_prefill: bool


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    block_copies: list[tuple[int, int]]  # copy-on-write copies to apply before the forward
    preempted: list[Sequence]


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.cfg = cfg
        self.kv = kv_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_held_steps = 0  # steps the admission hold kept the queue waiting since someone last joined

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.request_id)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.request_id)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self, drafting: bool = True) -> SchedulerOutput:
        """``drafting`` False (the engine's batch gate is closed): decode sequences that may be
        switched off get slots for their root alone."""
        budget = self.cfg.max_num_batched_tokens
        if not self.waiting:
            self.num_held_steps = 0
        holding = self.holds_queue()
        if holding:
            self.num_held_steps += 1
        scheduled: list[ScheduledSequence] = []
        copies: list[tuple[int, int]] = []
        preempted: list[Sequence] = []
        index = 0
        while index < len(self.running):
            seq = self.running[index]
            if seq.is_prefilling:
                num_slots = min(seq.num_pending, self.cfg.prefill_chunk_size, budget)
            else:
                drafts = seq.num_draft_slots if drafting or seq.switch_off is None else 0
                num_slots = min(1 + drafts, budget)
            if num_slots == 0:
                break
            try:
                copies += self.kv.allocate_slots(seq.request_id, seq.num_computed, num_slots)
            except NoFreeBlocks:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                continue  # retry this sequence (unless it was the victim)
            scheduled.append(ScheduledSequence(seq, num_slots, seq.is_prefilling))
            budget -= num_slots
            index += 1

        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs and not holding:
            seq = self.waiting[0]
            if seq in preempted:
                break  # do not readmit in the step that preempted it
            seq.num_computed = self.kv.add_sequence(seq.request_id, seq.token_ids)
            num_slots = min(seq.num_pending, self.cfg.prefill_chunk_size, budget)
            try:
                copies += self.kv.allocate_slots(seq.request_id, seq.num_computed, num_slots)
            except NoFreeBlocks:
                self.kv.free(seq.request_id)
                seq.num_computed = 0
                break
            self.waiting.popleft()
            self.num_held_steps = 0  # a hold ends when someone joins (not when a release finds no room)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_slots, seq.is_prefilling))
            budget -= num_slots
        return SchedulerOutput(scheduled, copies, preempted)

    def holds_queue(self) -> bool:
        """Whether the admission hold (``SchedulerConfig.prefill_hold_steps``) keeps every waiting
        request out of the next step; no state changes. It holds only while every running
        sequence decodes and fewer than ceil(ratio x running) requests could join (waiting, with
        room for them: near ``max_num_seqs`` it waits for room to grow), for at most
        ``prefill_hold_steps`` steps; a release that admits nobody (no free KV blocks) leaves the
        count at the limit, so the next step releases again."""
        if self.cfg.prefill_hold_steps == 0 or not self.waiting or self.num_held_steps >= self.cfg.prefill_hold_steps:
            return False
        if not self.running or any(seq.is_prefilling for seq in self.running):
            return False  # an idle engine, or a prompt rides in this step anyway
        admissible = min(len(self.waiting), self.cfg.max_num_seqs - len(self.running))
        return admissible < max(1, math.ceil(self.cfg.prefill_hold_ratio * len(self.running)))
