"""The engine: add requests, call ``step`` until done, read ``RequestOutput``s.

One step = schedule -> propose -> one target forward over every sequence's tree ->
verify -> accept -> commit -> detokenize. Prefill chunks ride in the same forward as chains.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from draft_models.base import Drafter
from specserve.cache.kv_cache import KVCache, choose_num_blocks
from specserve.cache.kv_cache_manager import KVCacheManager
from specserve.config import EngineConfig, SamplingParams, SpeculationParams, SpeculativeConfig
from specserve.engine.batch_gate import BatchGate
from specserve.engine.calibration import (
    CALIBRATION_CONTEXT,
    CALIBRATION_SIZES,
    StepCost,
    load_or_measure,
    select_nodes_by_cost,
)
from specserve.engine.cuda_graphs import graph_buckets_for
from specserve.engine.detokenizer import IncrementalDetokenizer
from specserve.engine.drafters import drafter_kv_layers, make_drafter
from specserve.engine.model_runner import ModelRunner, TreeBatchItem
from specserve.engine.outputs import RequestOutput, StepStats
from specserve.engine.scheduler import ScheduledSequence, Scheduler
from specserve.engine.sequence import NO_SPECULATION, Sequence, SequenceStatus
from specserve.engine.speculative import accept, commit, propose, verify
from specserve.engine.switch_off import AcceptancePrior, DraftStep, SwitchOff
from specserve.engine.token_counts import TokenCounts
from specserve.errors import RequestError, SpecserveError
from specserve.models.loader import LoadedModel, cache_root, load_model
from specserve.tree import TokenTree


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.loaded = loaded if loaded is not None else load_model(config.model)
        self.tokenizer = self.loaded.tokenizer
        arch = self.loaded.arch
        cache_cfg = config.cache
        num_blocks = choose_num_blocks(
            arch, cache_cfg, self.loaded.dtype, self.loaded.device,
            extra_layers=drafter_kv_layers(config.speculative, self.loaded),
        )
        self.kv_manager = KVCacheManager(num_blocks, cache_cfg.block_size, cache_cfg.enable_prefix_caching)
        self.graph_buckets = graph_buckets_for(config, self.loaded)  # None: every forward eager
        self.kv_cache = KVCache(  # with graphs, one block past the pool: padding rows' dummy block
            arch.num_layers, num_blocks + (self.graph_buckets is not None), cache_cfg.block_size,
            arch.num_kv_heads, arch.head_dim, self.loaded.dtype, self.loaded.device,
        )
        self.runner = ModelRunner(self.loaded.model, self.kv_cache, self.kv_manager, graph_buckets=self.graph_buckets)
        self.num_kernel_variants = self.loaded.model.attention.warm_up(  # no compile stalls mid-serving
            arch, cache_cfg.block_size, self.max_model_len + config.speculative.max_tree_tokens + 1,
            self.loaded.dtype, self.loaded.device,
        )
        # every graph now, not on a bucket's first use mid-serving (an eager forward plus a
        # capture: several passes); an offloaded model's capture streams its weights twice per
        # bucket, so there only the one-sequence buckets (one per token size), the rest on first use
        offloaded = self.loaded.residency is not None
        self.num_graphs_captured = self.runner.capture_graphs(1 if offloaded else None)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager)
        self.step_cost: StepCost | None = None  # the auto budget's and the switch-off's cost curve
        select_counts = None
        spec = config.speculative
        if spec.enabled and (spec.budget == "auto" or spec.switch_off):
            self.step_cost = self._calibrate(spec)
        if spec.enabled and spec.budget == "auto":
            select_counts = functools.partial(select_nodes_by_cost, self.step_cost)
        self.drafter: Drafter | None = make_drafter(
            config.speculative, self.loaded, num_blocks, cache_cfg.block_size,
            config.scheduler.max_num_seqs, select_counts, self.graph_buckets,
        )
        self.num_draft_slots = config.speculative.max_tree_tokens if self.drafter else 0
        # engine-wide: drafting only while whole decode steps measurably gain at this batch size
        self.gate = BatchGate(2 * spec.probe_interval) if self.drafter and spec.switch_off else None
        self.sequences: dict[str, Sequence] = {}
        # the switch-off's engine-wide tokens per drafting step, per set of drafters a request uses
        self.acceptance_priors: dict[tuple[str, ...], AcceptancePrior] = {}
        self.seed_rng = random.Random(config.model.seed)
        self.request_counter = 0
        self.last_step: StepStats | None = None  # timing of the latest step that ran a forward

    def _calibrate(self, spec: SpeculativeConfig) -> StepCost:
        """The step-cost curve: from spec.step_cost if given, else measured once and cached."""
        if spec.step_cost is not None:
            try:
                return StepCost.from_json(Path(spec.step_cost).read_text())
            except (OSError, ValueError, KeyError) as exc:
                raise SpecserveError(f"cannot read step_cost file {spec.step_cost}: {exc}") from None
        device = self.loaded.device
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}"
        dtype = str(self.loaded.dtype).removeprefix("torch.")
        mode = "eager" if self.graph_buckets is None else "graphs"  # the two cost curves differ by 10x
        residency = self.loaded.residency  # an offloaded model's passes cost what its copies cost
        if residency is not None:  # and what its prefetch hides: B - 1 layers per pass
            mode += (f"-resident{residency.num_resident}of{self.loaded.arch.num_layers}"
                     f"-buffers{self.loaded.model.streamer.num_buffers}")
        tag = f"{device_name}-{self.loaded.name}-{dtype}-bs{self.config.cache.block_size}-{mode}".replace(" ", "_")
        # sizes up to twice a full tree, and with graphs up to the largest graph step (what a batch
        # of trees can reach); the context shrinks to fit small models and pools
        room = min(self.max_model_len, self.num_kv_tokens)
        largest = 2 * (1 + spec.max_tree_tokens)
        if self.graph_buckets is not None:
            largest = max(largest, self.graph_buckets.token_sizes[-1])
        sizes = tuple(n for n in CALIBRATION_SIZES if n <= max(2, min(largest, room // 2)))
        context_len = min(CALIBRATION_CONTEXT, room - sizes[-1])
        suffix = "" if context_len == CALIBRATION_CONTEXT else f"-ctx{context_len}"
        cache_file = cache_root() / "calibration" / f"{tag}-{sizes[-1]}{suffix}.json"
        return load_or_measure(self.runner, cache_file, sizes, context_len)

    def memory_report(self) -> dict[str, int]:
        """Weight bytes on the device and in host memory, resident layers, KV pool bytes."""
        residency = self.loaded.residency
        kv_bytes = self.kv_cache.kv.numel() * self.kv_cache.kv.element_size()
        if residency is not None:
            return {"device_bytes": residency.device_bytes, "host_bytes": residency.host_bytes,
                    "resident_layers": residency.num_resident, "kv_cache_bytes": kv_bytes}
        weights = sum(p.numel() * p.element_size() for p in self.loaded.model.parameters())
        return {"device_bytes": weights, "host_bytes": 0, "resident_layers": self.loaded.arch.num_layers,
                "kv_cache_bytes": kv_bytes}

    @property
    def max_model_len(self) -> int:
        return self.loaded.max_model_len

    @property
    def num_kv_tokens(self) -> int:
        return self.kv_manager.pool.num_blocks * self.kv_manager.block_size

    # ---- requests -----------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError (one sentence: what is wrong, what to do) for a request we cannot serve."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise RequestError("the prompt is empty: send at least one token of text", "prompt")
        vocab = self.loaded.arch.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        if any(token_id >= vocab for token_id, _ in params.logit_bias):
            raise RequestError(f"logit_bias keys must be token ids in [0, {vocab})", "logit_bias")
        total = num_prompt + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"the prompt has {num_prompt} tokens and max_tokens is {params.max_tokens}: "
                f"{total} tokens exceed the model's context of {self.max_model_len}; "
                "shorten the prompt or lower max_tokens",
                "max_tokens" if num_prompt < self.max_model_len else "prompt",
            )
        needed = total + self.num_draft_slots
        if self.kv_manager.num_blocks_for(needed) > self.kv_manager.pool.num_blocks:
            raise RequestError(
                f"the prompt ({num_prompt} tokens) plus max_tokens ({params.max_tokens}) needs "
                f"more KV cache than the pool holds ({self.num_kv_tokens} tokens); lower max_tokens "
                "or start the engine with a larger KV cache",
                "max_tokens",
            )

    def resolve_speculation(self, requested: SpeculationParams | None) -> SpeculationParams:
        """A request's policy within this engine's limits: budgets clamped to the server's, drafters
        the server does not run dropped, disabled when nothing is left to draft with."""
        spec = self.config.speculative
        requested = requested or SpeculationParams()
        if self.drafter is None or not requested.enabled:
            return NO_SPECULATION
        drafters = tuple(d for d in spec.drafter_names if requested.drafters is None or d in requested.drafters)
        max_tree_tokens = min(spec.max_tree_tokens, _or(requested.max_tree_tokens, spec.max_tree_tokens))
        max_depth = min(spec.max_depth, _or(requested.max_depth, spec.max_depth))
        if not drafters or max_tree_tokens == 0 or max_depth == 0:
            return NO_SPECULATION
        return SpeculationParams(True, max_tree_tokens, max_depth, drafters)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        arrival_time: float | None = None,
        speculation: SpeculationParams | None = None,
    ) -> str:
        """Queue a request; ``speculation`` (None: the server's defaults) is clamped to the server's."""
        prompt_token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_request(prompt_token_ids, params)
        if request_id is None:
            request_id = f"req-{self.request_counter}"
        if request_id in self.sequences:
            raise RequestError(f"request id {request_id!r} is already in use", "request_id")
        self.request_counter += 1
        seed = params.seed if params.seed is not None else self.seed_rng.getrandbits(63)
        generator = torch.Generator(device=self.loaded.device).manual_seed(seed)
        seq = Sequence(
            request_id=request_id,
            token_ids=prompt_token_ids,
            num_prompt_tokens=len(prompt_token_ids),
            params=params,
            generator=generator,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop),
            arrival_time=time.perf_counter() if arrival_time is None else arrival_time,
            speculation=self.resolve_speculation(speculation),
        )
        spec = self.config.speculative
        # a seeded sampled request is never switched off: the decision rests on timings and on other
        # requests, and which trees are verified decides which random draws make its text
        if seq.speculation.enabled and spec.switch_off and self.step_cost is not None and not params.reproducible:
            prior = self.acceptance_priors.setdefault(seq.speculation.drafters, AcceptancePrior())
            starts_on = prior.pays(self.step_cost, spec.switch_off_window)
            make = SwitchOff if starts_on else SwitchOff.starting_off
            seq.switch_off = make(spec.switch_off_window, spec.probe_interval)
        if params.uses_history:
            seq.token_counts = TokenCounts.from_tokens(
                prompt_token_ids, [], self.loaded.arch.vocab_size, self.loaded.device
            )
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; None if it is unknown or already finished."""
        seq = self.sequences.get(request_id)
        if seq is None:
            return None
        seq.finish_reason = "abort"
        return self._finish(seq, [])

    def has_unfinished(self) -> bool:
        return bool(self.sequences)

    # ---- the step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if not self.sequences:
            return []
        step_start = time.perf_counter()
        # the batch gate decides before scheduling: a plain step reserves no draft slots. Only a
        # step that can only decode (nothing waiting or prefilling) counts as a decision and is
        # measured; others follow the bucket's measured rates without probing
        num_decoding = sum(not seq.is_prefilling for seq in self.scheduler.running)
        decode_only = num_decoding == len(self.scheduler.running) and (
            not self.scheduler.waiting or self.scheduler.holds_queue())
        gate_open = self.gate is None or not num_decoding or self.gate.allows_drafting(num_decoding, decide=decode_only)
        plan = self.scheduler.schedule(gate_open)
        self.kv_cache.copy_blocks(plan.block_copies)
        if not plan.scheduled:
            return []
        prefills = [s for s in plan.scheduled if s.is_prefill]
        decodes = [s for s in plan.scheduled if not s.is_prefill]
        items: list[TreeBatchItem] = []
        for s in prefills:
            chunk = s.seq.token_ids[s.seq.num_computed : s.seq.num_computed + s.num_slots]
            items.append(TreeBatchItem(s.seq.request_id, s.seq.num_computed, TokenTree.chain(chunk)))
        decode_seqs = [s.seq for s in decodes]
        draft_start = time.perf_counter()
        trees = propose(self.drafter, decode_seqs, self._tree_slots(prefills, decodes))
        verify_start = time.perf_counter()
        items += [TreeBatchItem(seq.request_id, seq.num_computed, tree) for seq, tree in zip(decode_seqs, trees)]

        # logits: the last row of a prefill chunk that completes its prompt, every decode tree row
        logit_rows: list[int] = []
        sampling_prefills, middle_chunks = [], []
        row = 0
        for s, item in zip(prefills, items):
            row += item.tree.num_nodes
            if s.seq.num_computed + s.num_slots == len(s.seq.token_ids):
                logit_rows.append(row - 1)
                sampling_prefills.append((s.seq, item.tree))
            else:
                middle_chunks.append(s)
        logit_rows += list(range(row, row + sum(t.num_nodes for t in trees)))
        wants_states = self.drafter is not None and self.drafter.needs_target_states
        eager_before = self.runner.num_eager_runs
        logits, hidden = self.runner.run(items, logit_rows, return_hidden=wants_states)
        if wants_states:  # a prefill chunk's K/V are all committed: so are its states
            item_starts = [0]  # first row of each item
            for item in items:
                item_starts.append(item_starts[-1] + item.tree.num_nodes)
            for i, s in enumerate(prefills):
                self.drafter.observe(s.seq.request_id, items[i].prefix_len, hidden[item_starts[i] : item_starts[i + 1]])
        for s in middle_chunks:  # nothing to sample yet: the chunk's K/V are simply committed
            s.seq.num_computed += s.num_slots
            self.kv_manager.register_committed(s.seq.request_id, s.seq.token_ids, s.seq.num_computed)

        # a completed prompt is a chain whose every node is accepted; its last row samples the bonus
        last_rows = [TokenTree((tree.token_ids[-1],), (-1,)) for _, tree in sampling_prefills]
        prefill_seqs = [seq for seq, _ in sampling_prefills]
        results = verify(prefill_seqs + decode_seqs, last_rows + trees, logits)
        now = time.perf_counter()
        verify_s = now - verify_start
        num_batch_tokens = sum(item.tree.num_nodes for item in items)
        draft_share = (verify_start - draft_start) / max(1, sum(tree.num_nodes > 1 for tree in trees))
        outputs = []
        moves: tuple[list[int], list[int]] = ([], [])  # every sequence's accepted-path slot moves
        try:
            for i, seq in enumerate(prefill_seqs + decode_seqs):
                result = results[i]
                if i < len(prefill_seqs):
                    tree = last_rows[i]
                    prefix_len = len(seq.token_ids) - 1
                    seq.num_computed = prefix_len  # the chain's K/V already sit in order
                else:
                    tree = trees[i - len(prefill_seqs)]
                    prefix_len = seq.num_computed
                    seq.spec.record(tree.num_nodes - 1, len(result.accepted_nodes) - 1)
                    if seq.switch_off is not None and tree.num_nodes == 1:
                        seq.switch_off.record(None, self.step_cost)  # a plain step: no prior to read
                    elif seq.switch_off is not None:
                        step = DraftStep(tree.num_nodes - 1, len(result.accepted_nodes) - 1,
                                         num_batch_tokens - tree.num_nodes, draft_share)
                        prior = self.acceptance_priors.get(seq.speculation.drafters)
                        if prior is None:
                            prior = self.acceptance_priors[seq.speculation.drafters] = AcceptancePrior()
                        seq.switch_off.record(step, self.step_cost, prior.mean)
                        prior.add(step)
                new_tokens = accept(seq, tree, result, self.loaded.eos_token_ids)
                new_tokens, text_ends = _detokenize(seq, new_tokens)
                seq.token_ids.extend(new_tokens)
                if seq.token_counts is not None:
                    seq.token_counts.add(new_tokens)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                if seq.finish_reason is not None:
                    outputs.append(self._finish(seq, new_tokens, text_ends))
                    continue
                commit(self.kv_manager, seq, prefix_len, result.accepted_nodes, moves)
                if self.drafter is not None:
                    self.drafter.commit(seq.request_id, seq.num_computed)
                if wants_states and i >= len(prefill_seqs):  # the accepted path's states, in order
                    first_row = item_starts[len(prefills) + i - len(prefill_seqs)]
                    self.drafter.observe(seq.request_id, prefix_len, hidden[[first_row + n for n in result.accepted_nodes]])
                outputs.append(self._output(seq, new_tokens, text_ends))
        finally:
            # also when a later sequence raises: committed sequences' blocks are already registered
            # in the prefix cache, so their K/V must sit in path order before anything reads them
            self.kv_cache.move_slots(*moves)  # one host-to-device copy and one gather-scatter per step
        total_s = time.perf_counter() - step_start
        if self.gate is not None and decode_only and decodes and not prefills:
            # a step the gate kept plain in which never-gated requests drafted measures neither rate
            drafted = any(tree.num_nodes > 1 for tree in trees)
            if gate_open or not drafted:
                num_new = sum(len(result.accepted_nodes) for result in results)
                self.gate.record(num_decoding, total_s, num_new, drafted)
        self.last_step = StepStats(
            num_seqs=len(items),
            num_tokens=sum(item.tree.num_nodes for item in items),
            num_draft_tokens=sum(tree.num_nodes - 1 for tree in trees),
            draft_s=verify_start - draft_start,
            verify_s=verify_s,
            total_s=total_s,
            gate_open=gate_open,
            num_prefills=len(prefills),
            eager_forward=self.runner.num_eager_runs > eager_before,
        )
        return outputs

    def _tree_slots(self, prefills: list[ScheduledSequence], decodes: list[ScheduledSequence]) -> list[int]:
        """Tokens each decode sequence's tree may hold this step: its scheduled slots (roots only
        for switch-off-eligible requests while the batch gate is closed), with CUDA graphs capped
        so that the step still replays a graph (``GraphBuckets.fit_trees``)."""
        slots = [s.num_slots for s in decodes]
        if self.graph_buckets is None:
            return slots
        return self.graph_buckets.fit_trees(sum(s.num_slots for s in prefills), slots)

    def _output(
        self, seq: Sequence, new_tokens: list[int], text_ends: list[int] | None = None,
        finish_time: float | None = None,
    ) -> RequestOutput:
        finished = seq.status == SequenceStatus.FINISHED
        text = seq.detokenizer.emittable(finished)
        switch_off = seq.switch_off
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=list(seq.generated_ids),
            new_token_ids=new_tokens,
            num_prompt_tokens=seq.num_prompt_tokens,
            finished=finished,
            finish_reason=seq.finish_reason,
            num_steps=seq.spec.num_steps,
            num_draft_tokens=seq.spec.num_draft_tokens,
            num_accepted_tokens=seq.spec.num_accepted_tokens,
            accepted_per_depth=list(seq.spec.accepted_per_depth),
            arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time,
            finish_time=finish_time,
            new_token_text_ends=[min(end, len(text)) for end in text_ends or []],
            speculation=seq.speculation,
            num_switch_offs=switch_off.num_switch_offs if switch_off else 0,
            num_switch_ons=switch_off.num_switch_ons if switch_off else 0,
            num_probe_steps=switch_off.num_probes if switch_off else 0,
            num_switched_off_steps=switch_off.num_off_steps if switch_off else 0,
        )

    def _finish(self, seq: Sequence, new_tokens: list[int], text_ends: list[int] | None = None) -> RequestOutput:
        self.scheduler.remove(seq)
        if self.drafter is not None:
            self.drafter.release(seq.request_id)
        seq.status = SequenceStatus.FINISHED
        del self.sequences[seq.request_id]
        return self._output(seq, new_tokens, text_ends, finish_time=time.perf_counter())

    # ---- offline convenience ------------------------------------------------------------

    def generate(
        self,
        prompts: Iterable[str | list[int]],
        params: SamplingParams | list[SamplingParams],
        speculation: SpeculationParams | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion together (continuous batching); outputs in prompt order."""
        prompts = list(prompts)
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params_list):
            self.check_request(self.tokenize(prompt) if isinstance(prompt, str) else list(prompt), p)
        ids = [self.add_request(prompt, p, speculation=speculation) for prompt, p in zip(prompts, params_list)]
        finals: dict[str, RequestOutput] = {}
        while len(finals) < len(ids):
            for out in self.step():
                if out.finished:
                    finals[out.request_id] = out
        return [finals[i] for i in ids]


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _detokenize(seq: Sequence, new_tokens: list[int]) -> tuple[list[int], list[int]]:
    """Feed a step's tokens to the detokenizer one at a time, as plain decoding would: the tokens
    up to the one that completes a stop string (which finishes the request), and the length of
    the emittable text after each of them."""
    text_ends = []
    for index, token in enumerate(new_tokens):
        seq.detokenizer.append([token])
        if seq.detokenizer.stop_hit is not None:
            seq.finish_reason, seq.stop_reason = "stop", seq.detokenizer.stop_hit
            text_ends.append(len(seq.detokenizer.text))
            return new_tokens[: index + 1], text_ends
        text_ends.append(len(seq.detokenizer.emittable(False)))
    return new_tokens, text_ends
