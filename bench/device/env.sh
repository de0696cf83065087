# Source on the GPU machine, from the checkout's root, in every call after call 1:
#     source bench/device/env.sh
# Joins the model's two halves (call 1 left part_aa in /root/specserve-cache; this call carries
# .devcarry/b), installs the carried wheels, copies carried drafts to $w and exports what
# the project's tools read. Fails with a message when call 1's half is gone (the machine went
# cold between calls: redo call 1). No `set -e` here: it would outlive this file in the calling
# script, and one failing step (a failed test) would end a call before its other steps.
c=${DEVICE_CACHE:-/root/specserve-cache}
w=${DEVICE_DRAFTS:-/root/w}
m=$c/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p $c $w
if [ ! -f $m ]; then
    if [ ! -f $c/part_aa ] || [ ! -f .devcarry/b/part_ab ]; then
        echo "env.sh: no model: call 1's part_aa or this call's .devcarry/b is missing (machine went cold? redo call 1)" >&2
        return 3 2>/dev/null || exit 3
    fi
    cat $c/part_aa .devcarry/b/part_ab > $m.tmp && mv $m.tmp $m || { echo "env.sh: joining the halves failed" >&2; return 3 2>/dev/null || exit 3; }
fi
if [ -d .devcarry/whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .devcarry/whl/*.whl
fi
for d in .devcarry/w1/* .devcarry/w2/*; do
    [ -d "$d" ] && cp -r "$d" $w/
done
export PYTHONPATH=/tmp/site:$PWD SPECSERVE_MODEL=$m SPECSERVE_CACHE_DIR=$c/cache
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# drafts: the carried copy, else the checkout's (present when weights were not moved aside)
for n in smollm2-feature11-1 smollm2-token9-1; do
    if [ ! -d $w/$n ] && [ -d draft_models/weights/$n ]; then cp -r draft_models/weights/$n $w/; fi
done
export F11=$w/smollm2-feature11-1 T9=$w/smollm2-token9-1
for d in $F11 $T9; do [ -d $d ] || echo "env.sh: no draft $d (carry .devcarry/w1 or w2): methods using it will fail" >&2; done
python3 -c "import torch, triton, transformers; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
