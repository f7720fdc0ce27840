#!/usr/bin/env bash
# The age model's training run on the lent GPU machine, in four calls chained while it is warm
# (scripts/device/README.md; one UTKFace shard a call, scripts/device/pack.sh). The recipe is the
# `tillsight train` line below.
#   train_age.sh setup   call 1: install the carried wheels, keep labels.csv and shard 00
#   train_age.sh keep    calls 2 and 3: keep shard 01, then 02
#   train_age.sh train   call 4: keep shard 03, train, put the results in $OUT
# Rehearsal on any machine: DATA=/path/with/shards LIMIT=60 SIZE=64 MINUTES=0.5 BATCH=16 \
#   SITE=/tmp/site OUT=/tmp/out scripts/device/train_age.sh train
# RECIPE: more `tillsight train` flags for this run, e.g. RECIPE="--oversample-minors 4 --label-sigma 3"
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-/tmp/utkface} SITE=${SITE:-/tmp/site} RUN=${RUN:-/tmp/run} OUT=${OUT:?OUT must be set}
SIZE=${SIZE:-160} BATCH=${BATCH:-256} MINUTES=${MINUTES:-7} LIMIT=${LIMIT:-}
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONPATH=$SITE:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PY=${PY:-python3}
mkdir -p "$DATA" && cp .device/data/* "$DATA"/ 2>/dev/null
case "${1:?setup, keep or train}" in
  setup)
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .device/whl/*.whl || exit 1
    # every module call 2 needs, imported now: a missing one costs this call, not the training's
    $PY -c "import keras, jax, edge.config, training.model, training.progress; print('keras', keras.__version__, 'jax', jax.__version__, jax.devices())" || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ls -la "$DATA" ;;
  keep)
    ls -la "$DATA" ;;
  train)
    # bfloat16 and batch 256 keep the H100 busy; 160 px instead of 224 doubles the epochs that fit
    # (and halves the CPU cost per face at the till); augmentation runs inside the compiled step.
    $PY -m edge train --data "$DATA" --out "$RUN" --input-size "$SIZE" --batch-size "$BATCH" \
      --learning-rate 2e-3 --weight-decay 0.02 --head distribution --epochs 400 --minutes "$MINUTES" \
      ${LIMIT:+--limit $LIMIT} ${RECIPE:-} 2>&1 | grep -v "^I0000\|^W0000\|absl::InitializeLog"
    status=${PIPESTATUS[0]}
    $PY scripts/device/weights.py pack "$RUN" "$OUT" && ls -la "$OUT"
    exit "$status" ;;
esac
