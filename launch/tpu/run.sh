#!/usr/bin/env bash
# Starts the same command on every worker of every slice, in the background (nohup), inside the checkout's
# virtualenv (its bin/ first on PATH), and returns. Each worker appends its output to $HOME/$LOG_DIR/$RUN_NAME.log
# and keeps the process id in $HOME/$LOG_DIR/$RUN_NAME.pid (logs.sh and stop.sh use them). The command is passed
# through word for word.
#
#   TPU_NAME=lm ZONE=us-east5-a RUN_NAME=imagenet-L launch/tpu/run.sh \
#       python -m latent_lm.main --config=configs/imagenet.py:L --workdir=gs://bucket/imagenet-L --mode=train \
#       --distributed=on --config.mesh.shape='(1,-1,1)'
#
# --distributed=on: a GCE TPU VM keeps its worker list in instance metadata, where jax.distributed.initialize()
# finds it; distributed.py's auto mode detects a TPU VM too, the explicit flag just removes any doubt.
# Multislice (NUM_SLICES > 1): nothing to set by hand, the queued resource gives every worker its MEGASCALE_*
# settings; make the mesh span the slices with --config.mesh.dcn_shape, e.g. 4 slices of v5p-128 (64 chips each):
#   --config.mesh.shape='(1,64,1)' --config.mesh.dcn_shape='(4,1,1)'      # FSDP inside a slice, DP across slices
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_settings
(($# > 0)) || die "usage: run.sh COMMAND [ARGS...], e.g. run.sh python -m latent_lm.main --config=... --workdir=..."
if [[ "$*" == *latent_lm.main* && "$*" != *--distributed* ]]; then
  echo "note: a multi-host TPU slice needs --distributed=on (see the top of this script)" >&2
fi
command=$(printf '%q ' "$@")
dir=$(printf '%q' "$REMOTE_DIR")
ssh_all "set -euo pipefail; mkdir -p \"\$HOME/$LOG_DIR\"; cd \"\$HOME\"/$dir
export VIRTUAL_ENV=\"\$PWD/.venv\" PATH=\"\$PWD/.venv/bin:\$PATH\"
if [ -f \"$REMOTE_PID\" ] && kill -0 \"\$(cat \"$REMOTE_PID\")\" 2>/dev/null; then
  echo \"error: run $RUN_NAME is already running on \$(hostname) (launch/tpu/stop.sh stops it)\" >&2; exit 1
fi
echo \"=== \$(date '+%F %T') \$(hostname): $RUN_NAME\" >> \"$REMOTE_LOG\"
nohup $command >> \"$REMOTE_LOG\" 2>&1 < /dev/null &
echo \$! > \"$REMOTE_PID\"
echo \"\$(hostname): started $RUN_NAME (pid \$!), log $LOG_DIR/$RUN_NAME.log\""
