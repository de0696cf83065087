"""The distillation pipeline behind ``python -m draft_models.train``: 1-3 small drafts, no download.

    prompts   data/train_prompts.jsonl (hand-written) + data/topics.txt x PROMPT_TEMPLATES,
              chat-templated like inference; data/heldout_prompts.jsonl for the manifest's
              figures; every ``validation_every``-th training prompt is held back to pick the
              best checkpoint.
    generate  the target's greedy, then temperature-sampled, continuations (engine, batched,
              cached as JSONL: a later run or ``--stage train`` reuses them; no job starts
              after ``--gen-budget-min``).
    teacher   one batched forward of the target over prompt + continuation: its final hidden
              state and argmax at every generated position.
    train     draft k: KL(target || draft) + CE on the target's argmax (draft_models/distill.py),
              on prompts reweighted by collective boost-tuning for k > 1 (draft_models/boost.py),
              and for k = 1 too against saved drafts named by ``--boost-against``;
              a feature draft (``--feature``) also reads the target's states, unrolled over
              several depths.
    evaluate  teacher-forced agreement, simulated chain/tree acceptance and the engine's real
              mean accepted length on the held-out prompts; weights + manifest per draft.

The GPU recipe (one command each, both under the device's 10-minute limit) is in
draft_models/README.md. ``--device cpu --tiny`` runs the whole pipeline in well under a
minute on two CPU cores (after the target loads) for tests.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from draft_models.boost import boost_weights, prompt_coverage
from draft_models.distill import TrainConfig, train_draft
from draft_models.distill_data import (
    DATA_DIR,
    generate_samples,
    generation_jobs,
    read_prompts,
    read_samples,
    samples_key,
    synthetic_prompts,
    teacher_force,
    write_samples,
)
from draft_models.evaluate import draft_ranks, engine_acceptance, heldout_metrics
from draft_models.feature_draft import FeatureDraft
from draft_models.parallel_generate import generate_samples_parallel
from draft_models.small_draft import (
    WEIGHTS_DIR,
    DraftSpec,
    build_draft_model,
    load_draft,
    resolve_draft_folder,
    save_draft,
    write_manifest,
)
from specserve.config import ModelConfig, SpeculativeConfig
from specserve.environment import environment
from specserve.errors import SpecserveError
from specserve.models.loader import LoadedModel, cache_root, load_model

EVAL_TREE = SpeculativeConfig(tree="dynamic", top_k=4, max_tree_tokens=64, max_depth=8)


@dataclass(frozen=True)
class RunConfig:
    """One training run, converted once from the command line."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    stage: str = "all"  # "generate": stop after caching the continuations
    train_prompts: str = str(DATA_DIR / "train_prompts.jsonl")
    heldout_prompts: str = str(DATA_DIR / "heldout_prompts.jsonl")
    topics: str | None = str(DATA_DIR / "topics.txt")
    max_train_prompts: int | None = None
    max_heldout_prompts: int | None = None
    validation_every: int = 20
    num_sampled: int = 2
    temperature: float = 0.7
    data_seed: int = 0  # the sampled continuations' seeds (part of their cache key); --seed is training's
    max_new_tokens: int = 192
    gen_batch: int = 128  # sequences per engine
    gen_workers: int = 1  # engine processes sharing the device (draft_models/parallel_generate.py)
    samples: str | None = None  # default: under $SPECSERVE_CACHE_DIR/draft_samples/
    samples_dtype: str | None = None  # the dtype the cached continuations were generated in (default: the target's)
    regenerate: bool = False
    time_budget_min: float = 14.0
    gen_budget_min: float = 8.0
    eval_reserve_s: float = 40.0  # per draft: held-out evaluation and saving
    teacher_batch_tokens: int = 32768
    num_drafts: int = 1
    spec: DraftSpec = DraftSpec(num_layers=2, init_from_target_layers=(0, 1))
    train: TrainConfig = TrainConfig()
    boost_floor: float = 0.25
    init_draft: str | None = None  # a saved draft to continue training from (build_draft_model)
    boost_against: tuple[str, ...] = ()  # saved drafts the first draft is boosted against, as if trained earlier
    out_dir: str = str(WEIGHTS_DIR)
    name: str = "smollm2-draft"
    engine_eval: SpeculativeConfig | None = EVAL_TREE
    argv: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.stage not in ("all", "generate"):
            raise SpecserveError(f"--stage must be all or generate, not {self.stage!r}")
        if not 1 <= self.num_drafts <= 3:
            raise SpecserveError(f"--num-drafts must be 1, 2 or 3, not {self.num_drafts}")
        if self.num_sampled < 0 or self.max_new_tokens < 2 or self.validation_every < 2:
            raise SpecserveError("use --num-sampled >= 0, --max-new-tokens >= 2 and --validation-every >= 2")
        if self.gen_batch < 1 or self.gen_workers < 1:
            raise SpecserveError("--gen-batch and --gen-workers must be at least 1")
        if self.samples_dtype not in (None, "float32", "bfloat16", "float16"):
            raise SpecserveError(f"--samples-dtype must be float32, bfloat16 or float16, not {self.samples_dtype!r}")
        if self.time_budget_min <= 0 or not 0 < self.gen_budget_min <= self.time_budget_min:
            raise SpecserveError("--gen-budget-min must be positive and at most --time-budget-min")


def run(cfg: RunConfig, loaded: LoadedModel | None = None) -> list[dict[str, Any]]:
    """The whole pipeline; returns each draft's manifest (empty for ``stage="generate"``)."""
    start, wall_start = time.perf_counter(), time.time()
    deadline = start + cfg.time_budget_min * 60
    target = loaded or load_model(ModelConfig(model=cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.train.seed))
    torch.manual_seed(cfg.train.seed)
    if cfg.init_draft is not None:  # a bad --init-draft fails now, not after generation and teacher forcing
        build_draft_model(cfg.spec, target, init_draft=cfg.init_draft)
    earlier = [load_draft(name, target) for name in cfg.boost_against]  # (so does a bad --boost-against)

    # 1. prompts
    hand = read_prompts(cfg.train_prompts)[: cfg.max_train_prompts]
    synthetic = synthetic_prompts(cfg.topics) if cfg.topics else []
    train_prompts = hand + synthetic
    heldout_prompts = read_prompts(cfg.heldout_prompts)[: cfg.max_heldout_prompts]

    # 2. generate (or reuse) the target's continuations
    jobs = generation_jobs(train_prompts, heldout_prompts, cfg.num_sampled, cfg.temperature, cfg.data_seed)
    gen_dtype = str(getattr(torch, cfg.samples_dtype)) if cfg.samples_dtype else str(target.dtype)
    key = samples_key(target, jobs, {"max_new_tokens": cfg.max_new_tokens, "dtype": gen_dtype})
    samples_path = Path(cfg.samples or cache_root() / "draft_samples" / f"samples-{key}.jsonl")
    cached = None if cfg.regenerate else read_samples(samples_path, key)
    if cached is None and gen_dtype != str(target.dtype):
        raise SpecserveError(f"{samples_path} holds no continuations of these prompts generated in {gen_dtype}: "
                             "leave out --samples-dtype to generate them with this target")
    if cached is not None:
        samples, gen_stats = cached
        gen_stats = {**gen_stats, "reused_from_cache": True}
    else:
        gen_deadline = wall_start + cfg.gen_budget_min * 60
        if cfg.gen_workers > 1:
            model_config = ModelConfig(model=cfg.model, device=cfg.device, dtype=cfg.dtype)
            samples, gen_stats = generate_samples_parallel(
                model_config, jobs, cfg.max_new_tokens, cfg.gen_batch, gen_deadline, cfg.gen_workers
            )
        else:
            samples, gen_stats = generate_samples(target, jobs, cfg.max_new_tokens, cfg.gen_batch, gen_deadline)
        write_samples(samples_path, key, gen_stats, samples)
    _log(f"samples: {gen_stats['num_samples']}/{gen_stats['num_jobs']} jobs, {gen_stats['num_generated_tokens']} "
         f"tokens, {gen_stats['tokens_per_s']} tok/s, {samples_path}")
    if cfg.stage == "generate":
        return []

    # 3. teacher forcing: validation prompts are held back from training entirely
    is_val = [i % cfg.validation_every == cfg.validation_every - 1 for i in range(len(train_prompts))]
    train_set = [s for s in samples if s.split == "train" and not is_val[s.prompt_index]]
    val_set = [s for s in samples if s.split == "train" and is_val[s.prompt_index] and s.temperature == 0]
    heldout_set = [s for s in samples if s.split == "heldout"]
    if not train_set:
        raise SpecserveError("no training continuations were generated: raise --gen-budget-min")
    tf_start = time.perf_counter()
    # a feature draft (trained, or boosted against) reads the target's state at every position
    keep = cfg.spec.feature_input
    keep_train = keep or any(isinstance(d, FeatureDraft) for d in earlier)  # (for their ranks only)
    teacher = teacher_force(target, train_set, cfg.teacher_batch_tokens, keep_train)
    validation = teacher_force(target, val_set, cfg.teacher_batch_tokens, keep)
    heldout = teacher_force(target, heldout_set, cfg.teacher_batch_tokens, keep)
    teacher_s = time.perf_counter() - tf_start
    _log(f"teacher forcing: {teacher.cu_rows[-1]} train rows, {validation.cu_rows[-1]} validation rows, "
         f"{heldout.cu_rows[-1]} held-out rows in {teacher_s:.1f}s")

    data = {
        "train_prompts": {"file": _rel(cfg.train_prompts), "count": len(hand)},
        "synthetic_prompts": {"topics_file": _rel(cfg.topics) if cfg.topics else None, "count": len(synthetic)},
        "heldout_prompts": {"file": _rel(cfg.heldout_prompts), "count": len(heldout_prompts)},
        "validation_prompts": sum(is_val),
        "samples": {"file": str(samples_path), "key": key, "data_seed": cfg.data_seed, **gen_stats,
                    "num_greedy": sum(s.temperature == 0 for s in samples),
                    "num_sampled": sum(s.temperature > 0 for s in samples), "temperature": cfg.temperature},
        "train_sequences": teacher.num_seqs, "train_rows": teacher.cu_rows[-1],
        "train_tokens": sum(len(x) for x in teacher.input_ids),
        "validation_sequences": validation.num_seqs, "heldout_sequences": heldout.num_seqs,
    }

    # 4-5. train, evaluate and save each draft; later drafts boosted towards earlier misses
    prompt_weights = [1.0] * len(train_prompts)
    train_ranks = [top1_ranks(d, teacher, cfg.train.batch_tokens) for d in earlier]
    if train_ranks:
        prompt_weights = boost_weights(prompt_coverage(train_ranks, teacher.prompt_index, len(train_prompts)),
                                       cfg.boost_floor)
    del earlier
    if keep_train and not keep:  # a token draft trains: the states (GBs on a GPU) served the ranks alone
        teacher = replace(teacher, states=None)
    manifests = []
    for k in range(cfg.num_drafts):
        drafts_left = cfg.num_drafts - k
        limit = max(1.0, (deadline - time.perf_counter() - cfg.eval_reserve_s * drafts_left) / drafts_left)
        draft = build_draft_model(cfg.spec, target, seed=cfg.train.seed + k, init_draft=cfg.init_draft)
        seq_weights = torch.tensor([prompt_weights[p] for p in teacher.prompt_index], dtype=torch.float64)
        train_cfg = replace(cfg.train, seed=cfg.train.seed + k)
        result = train_draft(draft, cfg.spec, target, teacher, seq_weights, validation, train_cfg, limit)
        _log(f"draft {k + 1}: {result.steps} steps ({result.stopped_by}), loss {result.losses[0]:.3f} -> "
             f"{result.losses[-1]:.3f}, best validation step {result.best_step}, {result.wall_s:.1f}s")
        metrics = heldout_metrics(draft_ranks(draft, heldout, cfg.train.batch_tokens))
        folder = Path(cfg.out_dir) / f"{cfg.name}-{k + 1}"
        manifest = _manifest(cfg, k, data, prompt_weights, result, metrics, target, start, teacher_s)
        save_draft(draft, cfg.spec, folder, manifest, target)
        if cfg.engine_eval is not None:
            greedy_heldout = [s for s in heldout_set if s.temperature == 0]
            metrics["engine"] = engine_acceptance(
                target, folder, [s.prompt_ids for s in greedy_heldout], [s.output_ids for s in greedy_heldout],
                cfg.max_new_tokens, cfg.engine_eval, min(cfg.gen_batch, 64),
            )
        else:
            metrics["engine"] = {"status": "not measured: --no-engine-eval"}
        manifest["wall_s"]["this_process"] = round(time.perf_counter() - start, 2)
        write_manifest(folder, manifest)
        _log(f"draft {k + 1} -> {folder}: held-out top-1 {metrics['top1_agreement']}, chain-8 "
             f"{metrics['chain_mean_accepted_length']['8']}, engine {metrics['engine'].get('mean_accepted_length')}")
        manifests.append(manifest)
        if k + 1 < cfg.num_drafts:
            train_ranks.append(top1_ranks(draft, teacher, cfg.train.batch_tokens))
            coverage = prompt_coverage(train_ranks, teacher.prompt_index, len(train_prompts))
            prompt_weights = boost_weights(coverage, cfg.boost_floor)
        del draft
    return manifests


def top1_ranks(draft, teacher, batch_tokens: int) -> list[torch.Tensor]:
    """Per sequence [rows]: the rank of the target's top-1 in the draft's guess for each row,
    at depth 1 for a feature draft (reading the target's real state), as boosting counts it."""
    return [r[0] if r.dim() == 2 else r for r in draft_ranks(draft, teacher, batch_tokens, num_depths=1)]


def _manifest(cfg: RunConfig, k: int, data: dict, prompt_weights: list[float], result, metrics: dict,
              target: LoadedModel, start: float, teacher_s: float) -> dict[str, Any]:
    weights = [w for w in prompt_weights]
    gen_s = data["samples"]["wall_s"]
    stride = max(1, len(result.losses) // 50)
    return {
        "draft": f"{cfg.name}-{k + 1}", "index": k + 1, "num_drafts": cfg.num_drafts,
        "target": {"name": target.name, "device": str(target.device), "dtype": str(target.dtype)},
        "spec": cfg.spec.to_dict(), "init_draft": _init_draft_info(cfg.init_draft), "data": data,
        "seed": cfg.train.seed + k,
        "boost": {
            "rule": "weight_p = floor + (1 - floor) * miss_p / mean(miss); miss_p = 1 - share of prompt p's "
                    "rows where any earlier draft's top-1 is the target's (draft_models/boost.py)",
            "floor": cfg.boost_floor, "earlier_drafts": k + len(cfg.boost_against),
            "boosted_against": [_rel(str(resolve_draft_folder(n))) for n in cfg.boost_against],
            "weight_min": round(min(weights), 4), "weight_max": round(max(weights), 4),
        },
        "training": {
            **asdict(replace(cfg.train, seed=cfg.train.seed + k)), "steps": result.steps,
            "stopped_by": result.stopped_by, "tokens_seen": result.tokens_seen, "rows_seen": result.rows_seen,
            "first_loss": round(result.losses[0], 5), "final_loss": round(result.losses[-1], 5),
            "final_loss_mean_last_20": round(sum(result.losses[-20:]) / len(result.losses[-20:]), 5),
            "loss_curve_stride": stride, "loss_curve": [round(x, 4) for x in result.losses[::stride]],
            "validation_top1": result.validation, "kept_step": result.best_step,
        },
        "heldout": metrics,
        "wall_s": {"generation": gen_s, "teacher_forcing": round(teacher_s, 2), "training": round(result.wall_s, 2),
                   "this_process": round(time.perf_counter() - start, 2)},
        "environment": environment(),
        "command": " ".join(["python -m draft_models.train", *cfg.argv]),
    }


def _init_draft_info(init_draft: str | None) -> dict[str, Any] | None:
    """Where a warm-started draft began: the saved draft and how long it had trained."""
    if init_draft is None:
        return None
    folder = resolve_draft_folder(init_draft)
    manifest = json.loads((folder / "manifest.json").read_text()) if (folder / "manifest.json").is_file() else {}
    training = manifest.get("training", {})
    return {"folder": _rel(str(folder)), "draft": manifest.get("draft"), "steps": training.get("steps"),
            "training_s": manifest.get("wall_s", {}).get("training"), "command": manifest.get("command")}


def _rel(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def _log(message: str) -> None:
    print(f"[draft_models.train] {message}", file=sys.stderr, flush=True)
