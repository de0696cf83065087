#!/bin/bash
# Call 3 (carry [".devcarry/b", ".devcarry/whl"]; the model is already joined if the machine
# stayed warm). #7 under load: fresh servers, speculation off and n-gram alternated, 16 and 32
# requests in flight, 512 requests of 128 tokens per run, 2 repeats; the JSON keeps each run's
# /metrics (step kinds, eager steps) and is rewritten after every run. About 5.5 minutes.
# Usage: bash bench/device/call3.sh TAG
set -u
tag=${1:?usage: call3.sh TAG}
source bench/device/env.sh || exit 3
timeout 450 python3 -m bench.serve_compare --spec off=off --spec ngram=ngram --concurrency 16,32 --repeats 2 \
    --prompt-set humaneval --prompt-set chat --num-prompts 512 --max-tokens 128 --request-rate inf \
    --out $OUT/serve_compare_$tag.json > $OUT/serve_compare_$tag.log 2>&1
tail -n 40 $OUT/serve_compare_$tag.log
