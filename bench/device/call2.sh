#!/bin/bash
# Call 2 (carry [".devcarry/b", ".devcarry/whl", ".devcarry/w2"]), right after call 1 (the
# machine stays warm 30 s). At most 20 + 320 + 230 = 570 s:
#   1. side by side (counts, not timings, so sharing the GPU changes nothing): #7's correctness
#      (GPU tests: graphs against eager, fp32 identical, bf16 partings at near-ties) and #4's
#      acceptance on every chat and HumanEval prompt, 256 tokens, one process per set, the
#      methods most needed first (a method is started only before the deadline; each finished
#      one is saved at once);
#   2. alone on the GPU: #7's batch-1 table, bench.latency, off / n-gram / transformers generate,
#      chat and HumanEval, 256 tokens, one run.
# Returns 7 files (the limit is 8).
# Usage: bash bench/device/call2.sh TAG
set -u
tag=${1:?usage: call2.sh TAG}
source bench/device/env.sh || exit 3
K='"tree":"dynamic","top_k":8,"max_tree_tokens":64,"max_depth":12'
acc() {  # $1: prompt set
    timeout 320 python3 -m bench.acceptance --prompt-set $1 --max-tokens 256 --max-num-seqs 164 \
        --kv-cache-memory 4 --no-plot --deadline-s 220 --out-dir $OUT --tag ${tag}_$1 \
        --method 'ngram={"method":"ngram","max_tree_tokens":64,"max_depth":12,"widths":[4]}' \
        --method "feat11={\"method\":\"draft\",\"draft_model\":\"$F11\",$K}" \
        --method "f11_tok9_ngram_or={\"method\":\"merge\",\"merge\":[\"draft:$F11\",\"draft:$T9\",\"ngram\"],$K,\"merge_rule\":\"noisy_or\",\"ngram_score\":0.6}" \
        --method "f11_ngram={\"method\":\"merge\",\"merge\":[\"draft:$F11\",\"ngram\"],$K}" \
        --method "f11_tok9_or={\"method\":\"merge\",\"merge\":[\"draft:$F11\",\"draft:$T9\"],$K,\"merge_rule\":\"noisy_or\"}" \
        > $OUT/acceptance_${tag}_$1.log 2>&1
}
acc chat & acc humaneval &
timeout 320 python3 -m pytest -q -s -m gpu tests/engine/test_cuda_graphs_gpu.py -p no:cacheprovider --durations 5 \
    > $OUT/gpu_tests_$tag.log 2>&1
wait
tail -n 3 $OUT/gpu_tests_$tag.log; tail -n 8 $OUT/acceptance_${tag}_chat.log $OUT/acceptance_${tag}_humaneval.log
timeout 230 python3 -m bench.latency --prompt-set chat --prompt-set humaneval --temperature 0 --num-prompts 10 \
    --max-tokens 256 --warmup-tokens 32 --methods off,ngram,hf --time-budget 170 --no-plots \
    --out-dir $OUT --tag batch1_$tag > $OUT/latency_batch1_$tag.log 2>&1
tail -n 12 $OUT/latency_batch1_$tag.log
