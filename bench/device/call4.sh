#!/bin/bash
# Call 4, only if `status` shows 600 s of device time left (carry [".devcarry/b", ".devcarry/whl",
# ".devcarry/w2"]; needs call 1's tok9 still on the machine): #4's second model draft for the chat merge. Generates the
# target's continuations for 3 minutes (fresh: a new machine has no cache), then trains a
# 2-layer feature draft warm-started from tok9 and boosted against feat11 and tok9 (SpecInfer's
# collective boost-tuning: prompts neither gets right weigh more; the chat merge will hold all
# three), all within 8 minutes. The draft
# comes back under $OUT/drafts (about 15 MB); its acceptance is the next session's call 2.
# Usage: bash bench/device/call4.sh TAG
set -u
tag=${1:?usage: call4.sh TAG}
source bench/device/env.sh || exit 3
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 540 python3 -m draft_models.train \
    --num-sampled 1 --temperature 0.7 --max-new-tokens 256 --gen-workers 6 --gen-batch 256 \
    --gen-budget-min 3.0 --time-budget-min 8.0 --samples $c/samples_$tag.jsonl \
    --out-dir $OUT/drafts --steps 60000 --eval-every 400 --num-layers 2 --init-layers 0,1 \
    --feature --feature-passes 2 --init-draft $T9 --boost-against $F11 --boost-against $T9 --seed 1 \
    --lr 5e-4 --warmup-steps 100 --name smollm2-feature13 2>&1 | tee $OUT/train_feature13_$tag.log | tail -n 40
gzip -c $c/samples_$tag.jsonl > $OUT/samples_$tag.jsonl.gz 2>/dev/null || true
