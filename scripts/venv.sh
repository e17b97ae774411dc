#!/usr/bin/env bash
# Prints the path of a virtual environment with aptos-ray and its dependencies installed.
#
# The environment lives outside the checkout (~/.cache/aptos-ray/venv-<hash>), keyed by the
# hash of pyproject.toml and this script, so a fresh clone (CI) reuses the ~6 GB install when
# the dependencies are unchanged and gets a new one the moment they change. The project itself
# is (re)installed editable every time, pointing at this checkout.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${APTOS_RAY_CACHE:-$HOME/.cache/aptos-ray}"
key="$(cat "$root/pyproject.toml" "$root/scripts/venv.sh" | sha256sum | cut -c1-12)"
venv="$cache/venv-$key"
python="${PYTHON:-python3}"

if [ ! -f "$venv/.complete" ]; then
  echo "aptos-ray: creating $venv (first time: about 3-5 minutes, ~6 GB)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  # torch first, pinned to the release that lies on this machine's disk (see README: other
  # machines may install any torch>=2.3 / torchvision>=0.18 pair that matches).
  "$venv/bin/pip" install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}" >&2
  "$venv/bin/pip" install -q -e "$root[dev]" >&2
  touch "$venv/.complete"
fi
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >&2 2>/dev/null \
  || "$venv/bin/pip" install -q --no-deps -e "$root" >&2
ln -sfn "$venv" "$root/.venv"
echo "$venv"
