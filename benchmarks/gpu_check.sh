#!/usr/bin/env bash
# The GPU check, in two parts, so that it runs on a GPU machine without Ray or network as well
# (the borrowed one: benchmarks/GPU_CHECK.md is the step-by-step procedure):
#
#     bash benchmarks/gpu_check.sh              # both parts
#     bash benchmarks/gpu_check.sh noray        # part 1: pytest -m gpu tests/test_gpu.py, then the
#                                               #   plain-PyTorch and --local throughput rows
#     bash benchmarks/gpu_check.sh ray          # part 2: pytest -m gpu tests/test_gpu_ray.py, then the
#                                               #   TorchTrainer rows (needs Ray: said so, not failed, without)
#
# Interpreter: $PYTHON, else .venv/bin/python, else python3, else python.
# Wheels brought along: every *.whl under .whl/ (or $WHEELS) is installed offline into $SITE
# (/tmp/aptos-ray-site) and put on PYTHONPATH; wheels too big for one transfer arrive as
# NAME.whl.part-* files over several calls and are joined once all parts are there
# (benchmarks/gpu_wheels.sh makes them). $SITE survives between calls while the machine stays up.
#
# Each part prints its table as soon as it has it; bench_gpu.py adds its rows to
# benchmarks/out/bench_gpu.json, so part 2's table holds part 1's rows too, and a time box keeps
# what finished. The GPU section of benchmarks/RESULTS.md is rewritten at the end of each part
# (benchmarks/out/gpu_check.md holds the same text, for copying back from a borrowed machine).
# Without CUDA it still runs: the tests skip, the table says "not run", RESULTS.md is left as it is.
# Exit status: 3 when nvidia-smi sees a GPU that torch cannot use; else non-zero when a GPU test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-all}
case "$PART" in noray|ray|all) ;; *) echo "usage: bash benchmarks/gpu_check.sh [noray|ray|all]" >&2; exit 2 ;; esac
OUTDIR=benchmarks/out
mkdir -p "$OUTDIR"
JSON=$OUTDIR/bench_gpu.json
SITE=${SITE:-/tmp/aptos-ray-site}
STASH=${STASH:-/tmp/aptos-ray-wheels}  # wheel parts wait here for the call that brings the rest
WHEELS=${WHEELS:-.whl}
# Time boxes (s), sized so each part ends inside 5 minutes: the borrowed machine gives a session
# 15 minutes in all, starts included.
TESTS1_S=${TESTS1_S:-120} BENCH1_S=${BENCH1_S:-170} TESTS2_S=${TESTS2_S:-150} BENCH2_S=${BENCH2_S:-130}

find_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null; then
            echo "$candidate"; return
        fi
    done
    echo "python3"
}
PY=$(find_python)
echo "interpreter: $(command -v "$PY" || echo "$PY") ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"

install_wheels() {
    # Parts first: stash them outside the tree, join each wheel whose parts are all there (sha256 checked).
    mkdir -p "$STASH"
    find "$WHEELS" -type f -name '*.whl.part-*' -exec cp -n {} "$STASH"/ \; 2>/dev/null
    find "$WHEELS" -type f -name '*.whl.sha256' -exec cp -n {} "$STASH"/ \; 2>/dev/null
    for sum in "$STASH"/*.whl.sha256; do
        [ -e "$sum" ] || continue
        wheel=${sum%.sha256}
        [ -e "$wheel" ] && continue
        parts=$(awk '{print $3}' "$sum")
        have=$(ls "$wheel".part-* 2>/dev/null | wc -l)
        if [ "$have" -lt "$parts" ]; then
            echo "wheels: $(basename "$wheel"): $have of $parts parts here, the rest comes with a later call"
            continue
        fi
        cat "$wheel".part-* > "$wheel.tmp" && mv "$wheel.tmp" "$wheel"
        (cd "$STASH" && awk '{print $1"  "$2}' "$(basename "$sum")" | sha256sum -c --quiet) \
            || { echo "wheels: $(basename "$wheel"): joined parts do not match their sha256" >&2; rm -f "$wheel"; exit 2; }
    done
    mapfile -t found < <(find "$WHEELS" "$STASH" -type f -name '*.whl' 2>/dev/null | sort)
    [ "${#found[@]}" -gt 0 ] || return 0
    # One version of each: the stash may hold a wheel the tree also brings.
    mapfile -t wheels < <(printf '%s\n' "${found[@]}" | awk -F/ '!seen[$NF]++')
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
        || { echo "wheels: pip could not install ${wheels[*]}" >&2; exit 2; }
    echo "wheels: installed ${#wheels[@]} into $SITE"
}
if [ -d "$WHEELS" ] || [ -d "$STASH" ]; then install_wheels; fi
if [ -d "$SITE" ]; then export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# A GPU that the driver sees but torch cannot run on (a torch built for another CUDA, a driver too
# old for it) must fail the check, not pass it as "no GPU, tests skipped".
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    if ! why=$("$PY" -c "
import torch
assert torch.cuda.is_available(), f'torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device'
assert float((torch.ones(8, device='cuda') * 2).sum()) == 16.0, 'a CUDA kernel gave a wrong result'
" 2>&1); then
        echo "GPU check FAILED: nvidia-smi sees $(nvidia-smi -L | head -1 | cut -d'(' -f1)but torch cannot use it: $(echo "$why" | tail -1)"
        exit 3
    fi
fi
HAS_CUDA=0
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" && HAS_CUDA=1

section() {
    # The GPU section of RESULTS.md from the rows so far, the tests' summaries above the table.
    "$PY" benchmarks/bench_gpu.py --render --json "$JSON" --tests-log "$@" > "$OUTDIR/gpu_check.md"
    if [ "$HAS_CUDA" = 1 ]; then "$PY" benchmarks/run.py --splice-section gpu "$OUTDIR/gpu_check.md"; fi
}

status=0
run_tests() {  # run_tests FILE LOG SECONDS
    timeout --signal=INT --kill-after=15 "$3" "$PY" -m pytest -m gpu "$1" -q -p no:cacheprovider 2>&1 | tee "$2"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "pytest -m gpu $1: stopped at its $3 s time box" | tee -a "$2"
    # pytest exits 5 when it selected nothing to run: not a failure here
    if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then status=$rc; fi
}
bench() {  # bench SECONDS MODES...
    local seconds=$1; shift
    if [ "$HAS_CUDA" = 1 ]; then
        timeout --signal=INT --kill-after=30 "$seconds" "$PY" benchmarks/bench_gpu.py --modes "$@" --json "$JSON" \
            --budget-s $((seconds * 2 / 3)) --tests-log "$OUTDIR"/gpu_tests_*.log
        local rc=$?  # 124: its time box ended it, and the table keeps the rows that finished
        if [ "$rc" != 0 ] && [ "$rc" != 124 ]; then status=$rc; fi
    else
        "$PY" benchmarks/bench_gpu.py --modes "$@"
        echo "No CUDA device: benchmarks/RESULTS.md keeps its GPU section (not run (no GPU lent))."
    fi
}

if [ "$PART" != ray ]; then
    echo "== part 1: GPU tests and throughput rows without Ray"
    rm -f "$JSON" "$OUTDIR"/gpu_tests_*.log
    run_tests tests/test_gpu.py "$OUTDIR/gpu_tests_noray.log" "$TESTS1_S"
    bench "$BENCH1_S" plain local --fixes
    section "$OUTDIR"/gpu_tests_*.log
fi
if [ "$PART" != noray ]; then
    echo "== part 2: GPU tests and throughput rows through Ray"
    if ! "$PY" -c "import ray.train.torch" 2>/dev/null; then
        echo "Ray rows: not run: Ray is not installed for $PY (bring its wheels: benchmarks/GPU_CHECK.md)"
    else
        run_tests tests/test_gpu_ray.py "$OUTDIR/gpu_tests_ray.log" "$TESTS2_S"
        bench "$BENCH2_S" ray
        section "$OUTDIR"/gpu_tests_*.log
    fi
fi
exit "$status"
