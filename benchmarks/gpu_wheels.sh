#!/usr/bin/env bash
# Wheels for the GPU check on a machine that has torch, timm, pyarrow, pandas, scikit-learn, opencv
# and pytest but no Ray and no network (the borrowed GPU machine: benchmarks/GPU_CHECK.md).
# Run HERE, where pip reaches PyPI; it fills one folder per device call, each under the size that
# one call may carry (64 MiB, the source tree included):
#
#     bash benchmarks/gpu_wheels.sh              # for the GPU machine's Python 3.12
#     PYVER=3.11 bash benchmarks/gpu_wheels.sh   # for this machine's Python (the rehearsal)
#
#   .whl/1/  tensorboardX (the --local runs' history), what Ray needs that the machine lacks, and
#            the first part of Ray's wheel
#   .whl/2/  the rest of Ray's wheel
#
# Ray's wheel alone (about 79 MB) is over one call's limit, so it travels split in two parts (cut
# so that both folders weigh the same) with its sha256; gpu_check.sh stashes the parts in /tmp
# (which outlives a call while the machine stays up) and joins them when the second call brings the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
PIP=${PIP:-python3 -m pip}
LIMIT=$((64 * 1024 * 1024))
OUT=${OUT:-.whl}  # the rehearsal (gpu_rehearse.sh) fills another folder
# Versions: the ones this project is tested with (pyproject's [cluster] extra, the shared venv).
FIRST=(tensorboardX==2.6.5)
RAY=ray==2.60.0
# Ray Train/Tune/Data and Ray's dashboard (which Ray Train needs) beyond what the machine has: the
# closure pip resolves against that machine's packages (benchmarks/gpu_rehearse.sh shows how).
SECOND=(jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        aiohttp-cors==0.8.1 colorful==0.5.8 py-spy==0.4.3 smart-open==9.0.4
        virtualenv==21.15.14 distlib==0.4.4 platformdirs==4.14.9 python-discovery==1.9.9
        opencensus==0.11.4 opencensus-context==0.1.3 google-api-core==2.44.0 google-auth==2.63.0
        googleapis-common-protos==1.76.0 proto-plus==1.29.0 pyasn1-modules==0.4.2 pyasn1==0.6.5
        cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
        opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
        opentelemetry-exporter-prometheus==0.66b2 opentelemetry-proto==1.45.2)

download() {  # download DEST SPEC...
    local dest=$1; shift
    $PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d "$dest" "$@"
}

rm -rf "$OUT" && mkdir -p "$OUT/1" "$OUT/2" "$OUT/ray"
download "$OUT/1" "${FIRST[@]}"
download "$OUT/1" "${SECOND[@]}"
download "$OUT/ray" "$RAY"
ray_wheel=$(ls "$OUT"/ray/ray-*.whl)
name=$(basename "$ray_wheel")
size=$(stat -c %s "$ray_wheel")
deps=$(du -sb "$OUT/1" | cut -f1)
first=$(( (size - deps) / 2 ))  # .whl/1 = deps + first, .whl/2 = the rest of the wheel
[ "$first" -gt 0 ] || first=1
head -c "$first" "$ray_wheel" > "$OUT/ray/$name.part-00"
tail -c +$((first + 1)) "$ray_wheel" > "$OUT/ray/$name.part-01"
echo "$(sha256sum "$ray_wheel" | cut -d' ' -f1) $name 2" > "$OUT/ray/$name.sha256"
mv "$OUT/ray/$name.part-00" "$OUT/1/"
mv "$OUT/ray/$name.part-01" "$OUT/2/"
cp "$OUT/ray/$name.sha256" "$OUT/1/" && mv "$OUT/ray/$name.sha256" "$OUT/2/"
rm -rf "$OUT/ray"

# What travels in a call: the tree (tracked and untracked files git does not ignore) plus .whl/N.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
status=0
for n in 1 2; do
    carried=$(du -sb "$OUT/$n" | cut -f1)
    total=$((tree + carried))
    verdict=ok; [ "$total" -le "$LIMIT" ] || { verdict="OVER the limit"; status=1; }
    printf '.whl/%s: %5.1f MiB + tree %4.1f MiB = %5.1f MiB of 64 MiB: %s\n' "$n" \
        "$(echo "$carried / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)" "$verdict"
done
exit "$status"
