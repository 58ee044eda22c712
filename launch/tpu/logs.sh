#!/usr/bin/env bash
# Shows the log of run RUN_NAME on one worker: launch/tpu/logs.sh [WORKER [SLICE]] (default worker 0 of slice 0,
# which is process 0: the one that prints progress and summaries). Settings: see common.sh and
#   TAIL_LINES=100  lines of history;  FOLLOW=1  keep following (tail -f; Ctrl-C leaves the run alone)
#
#   TPU_NAME=lm ZONE=us-east5-a RUN_NAME=imagenet-L launch/tpu/logs.sh 3
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_settings
WORKER=${1:-0}
SLICE=${2:-0}
TAIL_LINES=${TAIL_LINES:-100}
FOLLOW=${FOLLOW:-1}
[[ "$WORKER" =~ ^[0-9]+$ && "$SLICE" =~ ^[0-9]+$ && "$TAIL_LINES" =~ ^[0-9]+$ ]] ||
  die "usage: logs.sh [WORKER [SLICE]]"
((SLICE < NUM_SLICES)) || die "slice $SLICE does not exist (NUM_SLICES=$NUM_SLICES)"
node=$TPU_NAME
if ((NUM_SLICES > 1)); then node=$TPU_NAME-$SLICE; fi
follow=""
if [[ "$FOLLOW" == "1" ]]; then follow="-f"; fi
ssh_one "$node" "$WORKER" "tail -n $TAIL_LINES $follow \"$REMOTE_LOG\""
