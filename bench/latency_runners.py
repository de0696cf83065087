"""The methods ``bench.latency`` times: our engine (any speculation) and transformers ``generate``.

Each runner takes a group of prompts (token ids), starts them together, and returns what it
observed: per request the generated ids and a timeline of (time, tokens) observations, plus
per-step timings where the method has steps we can see into. Clocks are read on the host
after the device has handed back the tokens (our verify and transformers' ``.cpu()`` sync).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from bench.common import sync
from bench.metrics import Acceptance, Timeline, truncate_observations
from specserve.config import SamplingParams
from specserve.engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int
    temperature: float
    ignore_eos: bool  # False: stop at EOS (--stop-at-eos)


@dataclass
class RequestRecord:
    token_ids: list[int]
    timeline: Timeline
    acceptance: Acceptance  # verification steps of this request (none for plain decoding)
    finish_reason: str | None = None
    num_switch_offs: int = 0  # our engine's per-request switch-off (0 for transformers)
    num_switched_off_steps: int = 0


@dataclass
class StepRecord:
    """One engine step: draft_s proposing trees, verify_s target forward + verification."""

    draft_s: float
    verify_s: float
    total_s: float
    num_seqs: int
    num_tokens: int
    num_draft_tokens: int
    decode_only: bool  # every request in the step had its first token before it
    gate_open: bool = True  # False: our engine's batch gate kept the step plain


@dataclass
class GroupResult:
    requests: list[RequestRecord]
    wall_s: float  # submit of the group to the last token of its last request
    steps: list[StepRecord] = field(default_factory=list)


class EngineRunner:
    """Our engine: requests added together, ``step`` driven here so every step is timed."""

    def __init__(self, engine: LLMEngine, settings: GenerationSettings) -> None:
        self.engine = engine
        self.settings = settings

    def params(self, seed: int | None, max_tokens: int) -> SamplingParams:
        s = self.settings
        return SamplingParams(max_tokens=max_tokens, temperature=s.temperature, seed=seed, ignore_eos=s.ignore_eos)

    def run_group(self, prompts: list[list[int]], seeds: list[int | None], max_tokens: int | None = None) -> GroupResult:
        engine = self.engine
        max_tokens = max_tokens or self.settings.max_tokens
        sync()
        start = time.perf_counter()
        request_ids = [engine.add_request(ids, self.params(seed, max_tokens), arrival_time=start)
                       for ids, seed in zip(prompts, seeds)]
        times: dict[str, list[float]] = {r: [] for r in request_ids}
        counts: dict[str, list[int]] = {r: [] for r in request_ids}
        finals = {}
        steps: list[StepRecord] = []
        while len(finals) < len(request_ids):
            decode_only = all(times[r] for r in request_ids if r not in finals)
            before = engine.last_step
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                if out.new_token_ids:
                    times[out.request_id].append(now)
                    counts[out.request_id].append(len(out.new_token_ids))
                if out.finished:
                    finals[out.request_id] = out
            stats = engine.last_step
            if stats is not None and stats is not before:
                steps.append(StepRecord(stats.draft_s, stats.verify_s, stats.total_s, stats.num_seqs,
                                        stats.num_tokens, stats.num_draft_tokens, decode_only, stats.gate_open))
        end = max(times[r][-1] for r in request_ids)
        requests = []
        for r in request_ids:
            out = finals[r]
            acceptance = Acceptance(out.num_steps, out.num_accepted_tokens, tuple(out.accepted_per_depth))
            requests.append(RequestRecord(list(out.token_ids), Timeline(start, tuple(times[r]), tuple(counts[r])),
                                          acceptance, out.finish_reason, out.num_switch_offs,
                                          out.num_switched_off_steps))
        return GroupResult(requests, end - start, steps)


class TimingStreamer:
    """A transformers streamer that only notes when tokens arrive and how many per sequence."""

    def __init__(self) -> None:
        self.saw_prompt = False
        self.times: list[float] = []
        self.counts: list[int] = []  # tokens per sequence in each call

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self.saw_prompt:  # generate() first streams the prompt itself
            self.saw_prompt = True
            return
        self.times.append(now)
        self.counts.append(1 if value.dim() <= 1 else value.shape[-1])

    def end(self) -> None:
        pass


def transformers_twin(loaded):
    """A transformers ``LlamaForCausalLM`` holding exactly the tensors of ``loaded`` (our model),
    un-fused by the loader's own name mapping, on its device and in its dtype; None where
    transformers' Llama cannot express the architecture (Qwen2's q/k/v-only bias, offloaded
    layers): load it with transformers then.

    Invariant: every parameter of the twin equals the rows of our fused parameter it came from,
    so both models compute the same function up to kernel numerics. (Loading a GGUF through
    transformers parses the file twice in Python, ~30 s for the 135M default model; this takes
    well under a second.)
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from specserve.models.loader import _target

    a = loaded.arch
    if loaded.residency is not None or a.attention_bias != a.o_proj_bias:
        return None
    rope = {"rope_type": a.rope_scaling.rope_type, "rope_theta": a.rope_theta}
    if a.rope_scaling.rope_type != "default":
        s = a.rope_scaling
        rope |= {"factor": s.factor, "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                 "original_max_position_embeddings": s.original_max_position_embeddings}
    config = LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
        head_dim=a.head_dim, max_position_embeddings=a.max_position_embeddings, rms_norm_eps=a.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=a.tie_word_embeddings, attention_bias=a.attention_bias,
        bos_token_id=a.bos_token_id, eos_token_id=list(loaded.eos_token_ids),
    )
    with torch.device("meta"):
        twin = LlamaForCausalLM(config)
    twin = twin.to_empty(device=loaded.device).to(loaded.dtype)
    ours = dict(loaded.model.named_parameters())
    with torch.no_grad():
        for name, param in twin.named_parameters():
            target = _target(name, a)
            if target is None:  # the tied LM head
                continue
            source, offset = target
            param.copy_(ours[source][offset : offset + param.shape[0]])
        twin.tie_weights()
    twin.model.rotary_emb = type(twin.model.rotary_emb)(config=config).to(loaded.device)  # meta left it empty
    return twin.eval()


def assistant_from_first_layers(model, num_layers: int):
    """A draft model for transformers' assisted generation: a copy of ``model`` keeping only its
    first ``num_layers`` decoder layers (then its final norm and LM head), like our early_exit."""
    total = model.config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"--hf-draft-layers must lie between 1 and {total - 1} for this {total}-layer model")
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:num_layers]
    draft.config.num_hidden_layers = num_layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:num_layers]
    return draft


class HFRunner:
    """transformers ``generate``: plain (``hf``), prompt lookup (``hf-lookup``) or with a draft
    model (``hf-assisted``). Left-padded batches for plain decoding; assisted modes are batch 1."""

    def __init__(self, model, settings: GenerationSettings, eos_token_ids: tuple[int, ...], pad_token_id: int,
                 generate_kwargs: dict | None = None) -> None:
        self.model = model
        self.settings = settings
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.generate_kwargs = generate_kwargs or {}

    @torch.inference_mode()
    def run_group(self, prompts: list[list[int]], seeds: list[int | None], max_tokens: int | None = None) -> GroupResult:
        s = self.settings
        max_tokens = max_tokens or s.max_tokens
        device = self.model.device
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        sampling = {"do_sample": True, "temperature": s.temperature, "top_k": 0, "top_p": 1.0} if s.temperature > 0 \
            else {"do_sample": False}
        if s.ignore_eos:
            sampling["min_new_tokens"] = max_tokens  # EOS is masked until max_tokens are out
        streamer = TimingStreamer()
        if seeds[0] is not None:
            torch.manual_seed(seeds[0])  # one generator for the whole batch: transformers has no per-row seeds
        sync()
        start = time.perf_counter()
        out = self.model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=max_tokens, pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_ids), streamer=streamer, **sampling, **self.generate_kwargs,
        )
        sync()
        requests = []
        for row in out[:, width:].tolist():
            ids = row
            if not s.ignore_eos:  # up to and including the first EOS; the rest is padding
                stop = next((i for i, t in enumerate(row) if t in self.eos_token_ids), None)
                ids = row if stop is None else row[: stop + 1]
            times, counts = truncate_observations(streamer.times, streamer.counts, len(ids))
            finish = "stop" if ids and ids[-1] in self.eos_token_ids and not s.ignore_eos else "length"
            requests.append(RequestRecord(ids, Timeline(start, tuple(times), tuple(counts)),
                                          Acceptance.from_step_sizes(counts), finish))
        end = max(r.timeline.times[-1] for r in requests)
        return GroupResult(requests, end - start)
