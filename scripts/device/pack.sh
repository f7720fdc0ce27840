#!/usr/bin/env bash
# Fill .device/ (git-ignored) with what device call N of the training job carries. A call takes 64 MiB
# together with the tracked tree, which travels with every call; since the shipped age model
# (edge/models/age_int8.onnx, 24 MB) the tree is ~28 MB, so one UTKFace shard (~23 MB) per call:
#   call 1: the wheels the machine lacks (keras, namex, optree; pydantic and its three: ~5.6 MB),
#           labels.csv and shard 00
#   call 2: shard 01          call 3: shard 02          call 4: shard 03, then train
# (scripts/device/train_age.sh setup | keep | keep | train). Refuses a call over the limit.
set -euo pipefail
cd "$(dirname "$0")/../.."
call=${1:?usage: scripts/device/pack.sh CALL_NUMBER (1 to 4)}
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
     cp "$shared/datasets/utkface/labels.csv" "$shared/datasets/utkface/images-00.tar.gz" .device/data/ ;;
  2|3|4) cp "$shared/datasets/utkface/images-0$((call - 1)).tar.gz" .device/data/ ;;
  *) echo "call must be 1 to 4" >&2; exit 2 ;;
esac
# what travels: tracked files and untracked ones git does not ignore, plus .device
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carry=$(du -sb .device | cut -f1)
limit=$((64 * 1024 * 1024))
awk -v c="$call" -v t="$tree" -v d="$carry" \
  'BEGIN { m = 1048576; printf "call %s: tree %.1f MiB + .device %.1f MiB = %.1f MiB of 64\n", c, t / m, d / m, (t + d) / m }'
[ $((tree + carry)) -le $((limit - 1024 * 1024)) ] || { echo "call $call would carry over 63 MiB" >&2; exit 1; }
