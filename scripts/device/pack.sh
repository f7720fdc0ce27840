#!/usr/bin/env bash
# Fill .device/ (git-ignored) with what device call N of the training job carries, each under
# the 64 MiB a call may carry with the ~3 MB tracked tree:
#   call 1: the wheels the machine lacks (keras, namex, optree; pydantic and its three: ~4 MB)
#           + shards 00-01 (~46 MB)
#   call 2: shards 02-03 (~46 MB), then train (scripts/device/train_age.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
call=${1:?usage: scripts/device/pack.sh CALL_NUMBER (1 or 2)}
shared=${TILLSIGHT_SHARED:-../shared}
git check-ignore -q .device/data || { echo ".device/ is not ignored by git" >&2; exit 1; }
rm -rf .device && mkdir -p .device/data
case "$call" in
  1) mkdir -p .device/whl
     cp "$shared"/wheels/device-py312/*.whl .device/whl/
     # `python -m edge` imports the config schema (pydantic), which the machine lacks: its cp312
     # wheels, at the versions this checkout's .venv runs, from the package index (cached)
     wheels=${XDG_CACHE_HOME:-$HOME/.cache}/tillsight/device-wheels
     pins=$(.venv/bin/python -c 'from importlib.metadata import version as v; print(" ".join(f"{n}=={v(n)}" for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")))')
     .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
       --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_17_x86_64 -d "$wheels" $pins
     for pin in $pins; do
       name=${pin%%==*}; ver=${pin##*==}
       cp "$wheels/${name//-/_}-$ver-"*.whl .device/whl/
     done
     cp "$shared/datasets/utkface/labels.csv" "$shared"/datasets/utkface/images-0[01].tar.gz .device/data/ ;;
  2) cp "$shared"/datasets/utkface/images-0[23].tar.gz .device/data/ ;;
  *) echo "call must be 1 or 2" >&2; exit 2 ;;
esac
du -sh .device
