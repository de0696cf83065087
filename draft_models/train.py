"""``python -m draft_models.train``: distil small drafts of the target (see draft_models/pipeline.py
for the steps and draft_models/README.md for the GPU recipe).

    python -m draft_models.train --num-drafts 3                # GPU: generate, train, evaluate
    python -m draft_models.train --device cpu --tiny --out-dir /tmp/drafts   # < 60 s smoke run
    python -m draft_models.train --feature --num-layers 1 --init-layers 0 --name smollm2-feature
"""

from __future__ import annotations

import argparse
import sys

from draft_models.distill import TrainConfig
from draft_models.pipeline import EVAL_TREE, RunConfig, run
from draft_models.small_draft import DraftSpec
from specserve.config import SpeculativeConfig
from specserve.errors import SpecserveError

# --tiny: the pipeline end to end at toy sizes (explicit flags still win)
TINY_DEFAULTS = dict(
    max_train_prompts=6, max_heldout_prompts=2, topics="none", validation_every=3, num_sampled=1,
    max_new_tokens=12, gen_batch=8, num_layers=1, init_layers="0", steps=12, batch_tokens=1024,
    lr=3e-3, warmup_steps=0, eval_every=6, time_budget_min=5.0, gen_budget_min=2.0, eval_reserve_s=5.0,
    name="tiny-draft", eval_speculative='{"tree": "static", "widths": [2, 1], "max_tree_tokens": 4, "max_depth": 2}',
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m draft_models.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d, t = RunConfig(), TrainConfig()
    p.add_argument("--model", default=None, help="target: GGUF file or checkpoint folder (default model if left out)")
    p.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default=d.dtype, choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--tiny", action="store_true", help="toy sizes for a CPU smoke run")
    p.add_argument("--stage", default=d.stage, choices=("all", "generate"),
                   help="generate: only generate and cache the target's continuations")
    p.add_argument("--train-prompts", default=d.train_prompts)
    p.add_argument("--heldout-prompts", default=d.heldout_prompts)
    p.add_argument("--topics", default=d.topics, help="topics file for synthetic prompts, or 'none'")
    p.add_argument("--max-train-prompts", type=int, default=None)
    p.add_argument("--max-heldout-prompts", type=int, default=None)
    p.add_argument("--validation-every", type=int, default=d.validation_every)
    p.add_argument("--num-sampled", type=int, default=d.num_sampled, help="sampled continuations per prompt")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--gen-batch", type=int, default=d.gen_batch, help="sequences each engine runs at once")
    p.add_argument("--gen-workers", type=int, default=d.gen_workers,
                   help="engine processes generating side by side on the one device")
    p.add_argument("--samples", default=None, help="continuations cache (JSONL); default under the cache dir")
    p.add_argument("--samples-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="reuse continuations --samples holds that the target generated in this dtype "
                        "(e.g. float32 on a CPU) with a target loaded in another")
    p.add_argument("--regenerate", action="store_true", help="ignore a cached continuations file")
    p.add_argument("--time-budget-min", type=float, default=d.time_budget_min)
    p.add_argument("--gen-budget-min", type=float, default=d.gen_budget_min)
    p.add_argument("--eval-reserve-s", type=float, default=d.eval_reserve_s)
    p.add_argument("--teacher-batch-tokens", type=int, default=d.teacher_batch_tokens)
    p.add_argument("--num-drafts", type=int, default=d.num_drafts, choices=(1, 2, 3))
    p.add_argument("--num-layers", type=int, default=d.spec.num_layers)
    p.add_argument("--intermediate-size", type=int, default=None)
    p.add_argument("--init-layers", default="0,1", help="target layers to start from, e.g. 0,1, or 'none'")
    p.add_argument("--init-draft", default=None,
                   help="continue training from this saved draft (folder or name; same layer shapes)")
    p.add_argument("--boost-against", action="append", default=[], metavar="DRAFT",
                   help="collective boost-tuning against a saved draft (repeatable): the first draft "
                        "trained here weights prompts by what these drafts miss")
    p.add_argument("--no-share-embedding", action="store_true")
    p.add_argument("--feature", action="store_true",
                   help="a feature-level (EAGLE-style) draft that also reads the target's hidden states")
    p.add_argument("--feature-passes", type=int, default=t.feature_passes,
                   help="feature drafts: draft depths unrolled in training")
    p.add_argument("--feature-weight", type=float, default=t.feature_weight,
                   help="feature drafts: weight of the hidden-state regression")
    p.add_argument("--hidden-size", type=int, default=None, help="only without a shared embedding")
    p.add_argument("--steps", type=int, default=t.max_steps, help="max steps per draft (time may stop it sooner)")
    p.add_argument("--batch-tokens", type=int, default=t.batch_tokens)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--warmup-steps", type=int, default=t.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--ce-weight", type=float, default=t.ce_weight)
    p.add_argument("--eval-every", type=int, default=t.eval_every)
    p.add_argument("--seed", type=int, default=t.seed,
                   help="training: initial noise and batch order (the continuations keep --data-seed's)")
    p.add_argument("--data-seed", type=int, default=d.data_seed,
                   help="seeds of the sampled continuations (another value generates, and caches, others)")
    p.add_argument("--boost-floor", type=float, default=d.boost_floor)
    p.add_argument("--out-dir", default=d.out_dir)
    p.add_argument("--name", default=d.name, help="drafts are written to OUT_DIR/NAME-1, NAME-2, ...")
    p.add_argument("--eval-speculative", default=None,
                   help="JSON SpeculativeConfig fields for the engine evaluation (method is set to draft)")
    p.add_argument("--no-engine-eval", action="store_true")
    return p


def config_from_args(argv: list[str]) -> RunConfig:
    parser = build_parser()
    if "--tiny" in argv:
        parser.set_defaults(**TINY_DEFAULTS)
    args = parser.parse_args(argv)
    init = () if args.init_layers in ("", "none") else tuple(int(x) for x in args.init_layers.split(","))
    spec = DraftSpec(num_layers=args.num_layers, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                     shares_embedding=not args.no_share_embedding, init_from_target_layers=init,
                     feature_input=args.feature)
    train = TrainConfig(max_steps=args.steps, batch_tokens=args.batch_tokens, lr=args.lr,
                        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                        ce_weight=args.ce_weight, seed=args.seed, eval_every=args.eval_every,
                        feature_passes=args.feature_passes, feature_weight=args.feature_weight)
    engine_eval = None if args.no_engine_eval else (
        SpeculativeConfig.parse(args.eval_speculative) if args.eval_speculative else EVAL_TREE
    )
    return RunConfig(
        model=args.model, device=args.device, dtype=args.dtype, stage=args.stage,
        train_prompts=args.train_prompts, heldout_prompts=args.heldout_prompts,
        topics=None if args.topics in (None, "", "none") else args.topics,
        max_train_prompts=args.max_train_prompts, max_heldout_prompts=args.max_heldout_prompts,
        validation_every=args.validation_every, num_sampled=args.num_sampled, temperature=args.temperature,
        data_seed=args.data_seed,
        max_new_tokens=args.max_new_tokens, gen_batch=args.gen_batch, gen_workers=args.gen_workers, samples=args.samples,
        samples_dtype=args.samples_dtype,
        regenerate=args.regenerate, time_budget_min=args.time_budget_min, gen_budget_min=args.gen_budget_min,
        eval_reserve_s=args.eval_reserve_s, teacher_batch_tokens=args.teacher_batch_tokens,
        num_drafts=args.num_drafts, spec=spec, train=train, boost_floor=args.boost_floor, init_draft=args.init_draft,
        boost_against=tuple(args.boost_against),
        out_dir=args.out_dir, name=args.name, engine_eval=engine_eval, argv=tuple(argv),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(config_from_args(argv))
    except SpecserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
