#!/usr/bin/env bash
# Fill .device/ (git-ignored) with what device call N needs, under the 64 MiB a call carries:
# call 1: wheels (~31 MB) + shard 00; call 2: shards 01-02; call 3: shard 03 (then train).
set -euo pipefail
cd "$(dirname "$0")/../.."
call=${1:?usage: scripts/device/pack.sh CALL_NUMBER (1, 2 or 3)}
shared=${TILLSIGHT_SHARED:-../shared}
grep -qx '/.device/' .git/info/exclude 2>/dev/null || grep -qx '/.device/' .gitignore || { echo "/.device/ is not ignored" >&2; exit 1; }
rm -rf .device && mkdir -p .device/data
cp "$shared/datasets/utkface/labels.csv" .device/data/
case "$call" in
  1) mkdir -p .device/whl
     cp "$shared"/wheels/device-py312/*.whl .device/whl/
     python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
       -d .device/whl "onnxruntime==1.31.*" "pydantic==2.*" "pydantic-core" "annotated-types" "typing-inspection" "paho-mqtt==2.*" "flatbuffers"
     cp "$shared"/datasets/utkface/images-00.tar.gz .device/data/ ;;
  2) cp "$shared"/datasets/utkface/images-0[12].tar.gz .device/data/ ;;
  3) cp "$shared"/datasets/utkface/images-03.tar.gz .device/data/ ;;
  *) echo "call must be 1, 2 or 3" >&2; exit 2 ;;
esac
du -sh .device
