"""Prometheus metrics of one server, in its own ``CollectorRegistry`` (never the global one).

Updated from the engine thread after every loop iteration (prometheus-client's metrics lock
internally), read by the asyncio thread for ``GET /metrics``. Speculation counters grow per
step by the difference to each request's previous output, so they move while requests run.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from specserve.engine.outputs import STEP_KINDS, RequestOutput, StepStats

STEP_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1,
                0.25, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.num_requests_running = Gauge("specserve_num_requests_running", "Sequences in the running batch.", registry=r)
        self.num_requests_waiting = Gauge("specserve_num_requests_waiting", "Sequences waiting to be scheduled.", registry=r)
        self.kv_cache_usage = Gauge("specserve_kv_cache_usage", "Fraction of KV blocks in use (0..1).", registry=r)
        self.kv_cache_used_blocks = Gauge("specserve_kv_cache_used_blocks", "KV blocks in use.", registry=r)
        self.kv_cache_total_blocks = Gauge("specserve_kv_cache_total_blocks", "KV blocks in the pool.", registry=r)
        self.time_to_first_token = Histogram(
            "specserve_time_to_first_token_seconds", "Arrival to first generated token.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inter_token_latency = Histogram(
            "specserve_inter_token_latency_seconds",
            "Time between a request's steps divided by the tokens the step produced (observed per token).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.e2e_request_latency = Histogram(
            "specserve_e2e_request_latency_seconds", "Arrival to finish.", buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("specserve_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("specserve_generation_tokens", "Generated tokens.", registry=r)
        self.spec_steps = Counter("specserve_spec_decode_steps", "Decode (verify) steps.", registry=r)
        self.spec_draft_tokens = Counter("specserve_spec_decode_draft_tokens", "Draft tokens proposed.", registry=r)
        self.spec_accepted_tokens = Counter(
            "specserve_spec_decode_accepted_tokens", "Draft tokens accepted.", registry=r
        )
        self.spec_accepted_per_depth = Counter(
            "specserve_spec_decode_accepted_tokens_per_depth", "Draft tokens accepted at each tree depth.",
            ["depth"], registry=r,
        )
        self.spec_mean_accepted_length = Gauge(
            "specserve_spec_decode_mean_accepted_length",
            "Tokens per decode step: 1 + accepted drafts / steps, over the server's life (0 before any step).",
            registry=r,
        )
        self.spec_switch_offs = Counter(
            "specserve_spec_decode_switch_offs",
            "Times a request stopped drafting: its recent acceptance made speculation slower than plain "
            "decoding for it under the measured step cost.", registry=r)
        self.spec_switch_ons = Counter(
            "specserve_spec_decode_switch_ons", "Times a probe step switched a request's drafting back on.",
            registry=r)
        self.spec_probe_steps = Counter(
            "specserve_spec_decode_probe_steps", "Drafting steps taken by switched-off requests to test "
            "whether speculation pays again.", registry=r)
        self.spec_switched_off_steps = Counter(
            "specserve_spec_decode_switched_off_steps", "Decode steps run without drafts because the request "
            "was switched off.", registry=r)
        self.requests_finished = Counter(
            "specserve_requests_finished", "Finished engine requests by finish reason.", ["finish_reason"], registry=r
        )
        self.requests_rejected = Counter(
            "specserve_requests_rejected", "HTTP generation requests turned away, by reason.", ["reason"], registry=r
        )
        self.engine_errors = Counter("specserve_engine_errors", "Engine steps that raised.", registry=r)
        self.engine_step_seconds = Histogram(
            "specserve_engine_step_seconds", "Wall time of one engine step, by kind: prefill (a prompt chunk "
            "rode along), drafting (decode only, some tree held a draft) or plain (decode only, no draft).",
            ["kind"], buckets=STEP_BUCKETS, registry=r)
        self.engine_step_phase_seconds = Counter(
            "specserve_engine_step_phase_seconds", "Engine step time by phase: draft (proposing trees), verify "
            "(target forward, verification, read-back) and other (scheduling, accepting, committing, "
            "detokenizing).", ["phase"], registry=r)
        self.engine_loop_seconds = Counter(
            "specserve_engine_loop_seconds", "Engine-thread time between consecutive engine steps (commands "
            "such as admitting requests, metrics, handing outputs to the event loop); the gap after an idle "
            "wait, a failed step or one that scheduled nothing is left out.", registry=r)
        for kind in STEP_KINDS:  # every series shows from the start, at 0
            self.engine_step_seconds.labels(kind)
        for phase in ("draft", "verify", "other"):
            self.engine_step_phase_seconds.labels(phase)
        self.engine_eager_steps = Counter(
            "specserve_engine_eager_steps", "Engine steps, by kind, whose target forward fit no CUDA-graph "
            "bucket and ran eagerly (on a GPU about 10x a replayed step's cost); 0 without graphs.",
            ["kind"], registry=r)
        for kind in STEP_KINDS:
            self.engine_eager_steps.labels(kind)
        self.spec_gate_closed_steps = Counter(
            "specserve_spec_decode_gate_closed_steps", "Decode steps in which the batch gate let no "
            "gated request draft: while drafting measures slower than plain steps at this batch size, "
            "while it learns both rates, and its plain probes.", registry=r)
        self.weights_device_bytes = Gauge(
            "specserve_weights_device_bytes", "Model weight bytes on the device (with offload: "
            "resident layers, embeddings and the streaming buffers).", registry=r)
        self.weights_host_bytes = Gauge(
            "specserve_weights_host_bytes", "Offloaded weight bytes in host memory, streamed once per forward.",
            registry=r)
        self.offload_resident_layers = Gauge(
            "specserve_offload_resident_layers", "Decoder layers kept on the device (all of them without offload).",
            registry=r)
        self.kv_cache_bytes = Gauge("specserve_kv_cache_bytes", "Bytes of the target's KV cache pool.", registry=r)
        # engine-thread state: the previous output and token time of every unfinished request
        self._previous: dict[str, RequestOutput] = {}
        self._last_token_time: dict[str, float] = {}
        self._total_steps = 0
        self._total_accepted = 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- engine thread ---------------------------------------------------------------------

    def record_engine_state(self, num_running: int, num_waiting: int, num_blocks: int, num_free_blocks: int) -> None:
        self.num_requests_running.set(num_running)
        self.num_requests_waiting.set(num_waiting)
        self.kv_cache_total_blocks.set(num_blocks)
        self.kv_cache_used_blocks.set(num_blocks - num_free_blocks)
        self.kv_cache_usage.set((num_blocks - num_free_blocks) / num_blocks)

    def record_memory(self, device_bytes: int, host_bytes: int, resident_layers: int, kv_cache_bytes: int) -> None:
        self.weights_device_bytes.set(device_bytes)
        self.weights_host_bytes.set(host_bytes)
        self.offload_resident_layers.set(resident_layers)
        self.kv_cache_bytes.set(kv_cache_bytes)

    def record_step(self, stats: StepStats) -> None:
        self.engine_step_seconds.labels(stats.kind).observe(stats.total_s)
        self.engine_step_phase_seconds.labels("draft").inc(stats.draft_s)
        self.engine_step_phase_seconds.labels("verify").inc(stats.verify_s)
        self.engine_step_phase_seconds.labels("other").inc(max(0.0, stats.total_s - stats.draft_s - stats.verify_s))
        if stats.eager_forward:
            self.engine_eager_steps.labels(stats.kind).inc()
        if stats.is_decode and not stats.gate_open:
            self.spec_gate_closed_steps.inc()

    def record_admitted(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def record_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        """One engine step's outputs. The speculation counters move once per call by the step's
        sums (a counter update takes a lock: per output, 32 sequences cost about 0.2 ms a step)."""
        steps = drafts = accepted = 0  # this call's sums over outputs
        for out in outputs:
            previous = self._previous.get(out.request_id)
            num_new = len(out.new_token_ids)
            if num_new:
                self.generation_tokens.inc(num_new)
                last = self._last_token_time.get(out.request_id)
                if last is None:
                    if out.first_token_time is not None:
                        self.time_to_first_token.observe(out.first_token_time - out.arrival_time)
                else:
                    for _ in range(num_new):
                        self.inter_token_latency.observe((now - last) / num_new)
                self._last_token_time[out.request_id] = now
            out_steps, out_drafts, out_accepted = self._record_spec_delta(previous, out)
            steps, drafts, accepted = steps + out_steps, drafts + out_drafts, accepted + out_accepted
            if out.finished:
                self._previous.pop(out.request_id, None)
                self._last_token_time.pop(out.request_id, None)
                self.requests_finished.labels(out.finish_reason or "unknown").inc()
                self.e2e_request_latency.observe((out.finish_time or now) - out.arrival_time)
            else:
                self._previous[out.request_id] = out
        if steps:
            self.spec_steps.inc(steps)
            if drafts:
                self.spec_draft_tokens.inc(drafts)
            if accepted:
                self.spec_accepted_tokens.inc(accepted)
            self._total_steps += steps
            self._total_accepted += accepted
            self.spec_mean_accepted_length.set(1.0 + self._total_accepted / self._total_steps)

    def _record_spec_delta(self, previous: RequestOutput | None, out: RequestOutput) -> tuple[int, int, int]:
        """Switch-off counters and accepted-per-depth from ``out``'s growth over ``previous``; its
        new (steps, draft tokens, accepted drafts), which ``record_outputs`` sums and applies."""
        for counter, name in ((self.spec_switch_offs, "num_switch_offs"), (self.spec_switch_ons, "num_switch_ons"),
                              (self.spec_probe_steps, "num_probe_steps"),
                              (self.spec_switched_off_steps, "num_switched_off_steps")):
            delta = getattr(out, name) - (getattr(previous, name) if previous else 0)
            if delta > 0:
                counter.inc(delta)
        steps = out.num_steps - (previous.num_steps if previous else 0)
        if steps <= 0:
            return 0, 0, 0
        drafts = out.num_draft_tokens - (previous.num_draft_tokens if previous else 0)
        accepted = out.num_accepted_tokens - (previous.num_accepted_tokens if previous else 0)
        # accepted_per_depth sums to num_accepted_tokens and only grows: no accepted draft this
        # step (every plain step), no depth moved
        before = previous.accepted_per_depth if previous else []
        for depth, count in enumerate(out.accepted_per_depth if accepted else ()):
            delta = count - (before[depth] if depth < len(before) else 0)
            if delta:
                self.spec_accepted_per_depth.labels(str(depth + 1)).inc(delta)
        return steps, drafts, accepted
