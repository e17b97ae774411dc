#!/usr/bin/env bash
# The GPU check: one command, at most 8 minutes on one GPU. Run it as is on any GPU machine:
#
#     bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#
# 1. pytest -m gpu (tests/test_gpu.py): resume on CUDA, Ray restart after an injected worker failure,
#    bf16 and fp16 AMP steps, channels_last, device-side augmentation, 2 DDP ranks sharing one GPU
#    (gloo), SyncBatchNorm on 2 ranks. At most 3.5 minutes.
# 2. benchmarks/bench_gpu.py: training images/s of tf_efficientnet_lite0, efficientnet_b0 and b2 at 224
#    and 384 px, plain PyTorch vs --local vs a 1-worker TorchTrainer, GPU memory, time waiting for data.
#    Rows that would start after its budget are skipped; at most 4.5 minutes.
# 3. Both go into the GPU section of benchmarks/RESULTS.md (only that section is rewritten).
#
# Without CUDA it still runs: the tests skip, the table says "not run", RESULTS.md is left as it is.
# Exit status: non-zero when a GPU test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p benchmarks/out
LOG=benchmarks/out/gpu_tests.log

timeout --signal=INT --kill-after=15 210 "$PYTHON" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
    2>&1 | tee "$LOG"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" = 124 ] && echo "pytest -m gpu: stopped at its 210 s time box" | tee -a "$LOG"

if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # run.py runs bench_gpu.py (with this log), prints its table and splices the GPU section into RESULTS.md.
    timeout --kill-after=15 270 "$PYTHON" benchmarks/run.py --only gpu --splice
    bench_rc=$?
else
    "$PYTHON" benchmarks/bench_gpu.py --tests-log "$LOG"
    bench_rc=$?
    echo "No CUDA device: benchmarks/RESULTS.md keeps its GPU section (not run (no GPU lent))."
fi
# pytest exits 5 when it selected nothing to run: not a failure here
[ "$tests_rc" = 0 ] || [ "$tests_rc" = 5 ] || exit "$tests_rc"
exit "$bench_rc"
