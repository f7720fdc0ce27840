#!/usr/bin/env bash
# The training job's four calls, here, under a Python 3.12 that has what the GPU machine has (its
# image's python3: JAX 0.11.2, onnxruntime 1.30, onnx 1.23 (edge/runtime.py reads model metadata with
# it), opencv-python-headless, h5py, matplotlib, rich, nvidia-ml-py, typing-extensions; no Keras, no
# pydantic: KINDS.md in the device library) and nothing else, so that a missing
# wheel fails here and not in the device minutes. Tiny settings: 600 faces, 64 px, 1.2 minutes.
#   scripts/device/rehearse_train.sh [WORK_DIR]      (default /tmp/rehearse-train)
# Needs a python3.12 (PATH, or pyenv's) and the package index for the venv (made once).
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:-/tmp/rehearse-train}
py312=""
for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 python3.12; do
  if "$candidate" --version >/dev/null 2>&1; then py312=$candidate; break; fi  # a pyenv shim may not run
done
[ -n "$py312" ] || { echo "rehearse_train: no python3.12 here (the GPU machine's version)" >&2; exit 1; }
venv=$work/venv
[ -x "$venv/bin/python" ] || "$py312" -m venv "$venv"
# every run, so that a venv made before the list grew gets what is new (quick when all is there)
"$venv/bin/pip" install -q --disable-pip-version-check "jax[cpu]==0.11.2" "onnxruntime==1.30.0" "onnx==1.23.1" \
  protobuf opencv-python-headless numpy h5py matplotlib rich absl-py ml-dtypes packaging nvidia-ml-py \
  prometheus-client typing-extensions
rm -rf "$work/data" "$work/site" "$work/run" "$work/out" "$work/local" && mkdir -p "$work/out"
export DATA=$work/data SITE=$work/site RUN=$work/run OUT=$work/out PY=$venv/bin/python
scripts/device/pack.sh 1
scripts/device/train_age.sh setup
for call in 2 3; do scripts/device/pack.sh $call && scripts/device/train_age.sh keep; done
scripts/device/pack.sh 4
LIMIT=600 SIZE=64 BATCH=32 MINUTES=1.2 scripts/device/train_age.sh train
.venv/bin/python scripts/device/weights.py unpack "$OUT" "$work/local"
echo "rehearsal passed: $work/local/checkpoints/best.keras"
