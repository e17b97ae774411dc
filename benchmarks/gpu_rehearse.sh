#!/usr/bin/env bash
# Rehearse the borrowed GPU machine's procedure (benchmarks/GPU_CHECK.md) here, under its limits:
#
#     bash benchmarks/gpu_rehearse.sh SOURCE_SITE_PACKAGES
#
# SOURCE_SITE_PACKAGES: a site-packages with this project's dependencies (the project's venv).
# 1. wheels for THIS machine's Python (gpu_wheels.sh with PYVER=3.x), each call's folder checked
#    against the 64 MiB a call may carry, the tree included;
# 2. a fresh venv that sees only the packages the GPU machine has (gpu_emulate.py: no Ray,
#    tensorboardX or pydantic), first on PATH, so gpu_check.sh finds it as `python3`, as there;
# 3. call 1: a copy of the tree as the device tool sends it (tracked and untracked-not-ignored files)
#    plus .whl/1, `bash benchmarks/gpu_check.sh noray`;
# 4. call 2: a fresh copy plus .whl/2 only, `bash benchmarks/gpu_check.sh ray`: Ray's wheel is joined
#    from the part call 1 left in the stash, installed, and imported;
# 5. a one-epoch TorchTrainer run on the CPU in that environment: Ray Train (and its dashboard)
#    really runs with the wheels brought, not only imports.
# Without a GPU the tests skip and the tables say "not run"; each step fails loudly otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=${1:?usage: bash benchmarks/gpu_rehearse.sh SOURCE_SITE_PACKAGES}
WORK=${WORK:-/tmp/aptos-gpu-rehearsal}
LIMIT=$((64 * 1024 * 1024))
PYVER=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
export SITE="$WORK/site" STASH="$WORK/stash"
# The time boxes are the GPU machine's; here the tests only collect and skip, slowly on shared cores.
export TESTS1_S=900 TESTS2_S=900
if [ "${ONLY_RAY_RUN:-0}" = 1 ]; then  # step 5 alone, on an earlier rehearsal's $WORK
    export PATH="$WORK/emu/bin:$PATH"
else
rm -rf "$WORK" && mkdir -p "$WORK"

echo "== 1. wheels for Python $PYVER, sizes per call"
PYVER=$PYVER OUT="$WORK/whl" bash benchmarks/gpu_wheels.sh 2>&1 | grep -v "WARNING: Location"

echo "== 2. an environment with the GPU machine's packages only"
python3 benchmarks/gpu_emulate.py "$SOURCE" "$WORK/emu"
export PATH="$WORK/emu/bin:$PATH"
if python3 -c "import ray" 2>/dev/null; then echo "the emulated environment has Ray: it should not" >&2; exit 1; fi

call() {  # call N PART: a copy of the tree as one device call gets it, with .whl/N, then gpu_check.sh PART
    local tree="$WORK/tree$1"
    mkdir -p "$tree"
    git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$tree"
    mkdir -p "$tree/.whl" && cp -r "$WORK/whl/$1" "$tree/.whl/$1"
    local size
    size=$(du -sb "$tree" | cut -f1)
    echo "== call $1: $(echo "$size / 1048576" | bc -l | cut -c1-5) MiB sent (limit 64 MiB)"
    [ "$size" -le "$LIMIT" ] || { echo "call $1 is over the 64 MiB limit" >&2; exit 1; }
    (cd "$tree" && PYTHONPATH= bash benchmarks/gpu_check.sh "$2")
}
call 1 noray
call 2 ray
fi

echo "== 5. a one-epoch TorchTrainer run with the wheels brought (CPU)"
cd "$WORK/tree2"
# A prepared synthetic dataset, as the GPU tests write it (preparing photos needs imagehash, not brought).
PYTHONPATH="$SITE:$PWD:$PWD/tests" python3 -c "from helpers import synthetic_subset; from pathlib import Path; \
synthetic_subset(Path('$WORK/data'), size=32, per_grade=4, copies=1)"
PYTHONPATH="$SITE:$PWD" timeout 900 python3 jobs/train.py --model.name=test_efficientnet --model.pretrained=none \
    --data.dataset="$WORK/data" --data.image_size=32 --train.batch_size=8 --train.epochs=1 --train.max_steps_per_epoch=2 --train.progress=false \
    --scaling.num_workers=1 --train.output="$WORK/runs" --train.name=rehearsal
test -s "$WORK/runs/rehearsal/metrics.jsonl"
echo "rehearsal: OK (Python $PYVER here; the GPU machine's is 3.12, whose wheels gpu_wheels.sh fetches by default)"
