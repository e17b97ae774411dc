#!/usr/bin/env bash
# Prints the path of a virtual environment with aptos-ray and its dependencies installed.
#
# The environment lives outside the checkout (~/.cache/aptos-ray/venv-<hash>), keyed by the
# hash of pyproject.toml and this script, so a fresh clone (CI) reuses the ~6 GB install when
# the dependencies are unchanged and gets a new one the moment they change. The project itself
# is (re)installed editable every time (a few seconds), pointing at this checkout.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${APTOS_RAY_CACHE:-$HOME/.cache/aptos-ray}"
key="$(cat "$root/pyproject.toml" "$root/scripts/venv.sh" | sha256sum | cut -c1-12)"
venv="$cache/venv-$key"
python="${PYTHON:-python3}"
log="$cache/install-$key.log"

quiet() {  # run pip quietly; show its log if it fails
  if ! "$@" >>"$log" 2>&1; then
    echo "aptos-ray: '$*' failed; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}

if [ ! -f "$venv/.complete" ]; then
  echo "aptos-ray: creating $venv (first time only: about 2-5 minutes, ~6 GB)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  : >"$log"
  "$python" -m venv "$venv"
  quiet "$venv/bin/pip" install --upgrade pip
  # torch first, pinned to the release that lies on this machine's disk; elsewhere any
  # torch>=2.3 with its matching torchvision works (TORCH_VERSION=... TORCHVISION_VERSION=...).
  quiet "$venv/bin/pip" install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
  quiet "$venv/bin/pip" install -e "$root[dev]"
  touch "$venv/.complete"
fi
quiet "$venv/bin/pip" install --no-deps -e "$root"
ln -sfn "$venv" "$root/.venv"
echo "$venv"
