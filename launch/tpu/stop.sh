#!/usr/bin/env bash
# Stops run RUN_NAME on every worker of every slice: SIGTERM first (the train loop writes a checkpoint at the next
# step boundary and exits 0, so the same run.sh command resumes it), SIGKILL after STOP_TIMEOUT seconds.
# Settings: see common.sh and
#   STOP_TIMEOUT=300  seconds to wait for the checkpoint;  FORCE=1  SIGKILL at once (no checkpoint)
#
#   TPU_NAME=lm ZONE=us-east5-a RUN_NAME=imagenet-L launch/tpu/stop.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_settings
STOP_TIMEOUT=${STOP_TIMEOUT:-300}
FORCE=${FORCE:-0}
[[ "$STOP_TIMEOUT" =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT=$STOP_TIMEOUT must be a number of seconds"
signal=TERM
if [[ "$FORCE" == "1" ]]; then signal=KILL; fi
ssh_all "pidfile=\"$REMOTE_PID\"
if [ ! -f \"\$pidfile\" ]; then echo \"\$(hostname): no run $RUN_NAME\"; exit 0; fi
pid=\$(cat \"\$pidfile\")
if kill -0 \"\$pid\" 2>/dev/null; then
  kill -$signal \"\$pid\"
  for _ in \$(seq $STOP_TIMEOUT); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done
  if kill -0 \"\$pid\" 2>/dev/null; then
    echo \"\$(hostname): still running after ${STOP_TIMEOUT}s, SIGKILL\"; kill -KILL \"\$pid\"
  fi
fi
rm -f \"\$pidfile\"
echo \"\$(hostname): stopped $RUN_NAME\""
