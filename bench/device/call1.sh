#!/bin/bash
# Call 1 of a GPU session (carry [".devcarry/a", ".devcarry/w1"]). Leaves the model's first half
# and the token draft on the machine, then spends the call on work that needs no model file:
# the Llama-3-8B shape and SmolLM2's shape, both with RANDOM weights (say so with their figures).
# Usage: bash bench/device/call1.sh TAG [stage]   (TAG names the result files, e.g. s14_h100;
#        "stage": only leave the half and the draft, when redoing call 1 on a machine gone cold)
set -u
tag=${1:?usage: call1.sh TAG}
c=${DEVICE_CACHE:-/root/specserve-cache}
w=${DEVICE_DRAFTS:-/root/w}
mkdir -p $c $w
cp .devcarry/a/part_aa $c/ || { echo "call1.sh: carry .devcarry/a (bash ../shared/device/stage.sh)"; exit 3; }
for d in .devcarry/w1/*; do [ -d "$d" ] && cp -r "$d" $w/; done
[ "${2:-}" = stage ] && { ls -la $c; exit 0; }
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
# #7: 8B shape (random bf16 weights): decode against the weight bytes over the copy bandwidth,
# verify 16/64/128 tree tokens at 1K context against one decode step
timeout 200 python3 -m bench.big_shape --repeats 50 --out $OUT/big_shape_$tag.json 2>&1 | tee $OUT/big_shape_$tag.log
# #7: SmolLM2's shape (random weights): decode, drafting and prompt-carrying step shapes
timeout 200 python3 -m bench.step_buckets --random-shape --device cuda --profile \
    --out $OUT/step_buckets_$tag.json 2>&1 | tee $OUT/step_buckets_$tag.log
ls -la $c
