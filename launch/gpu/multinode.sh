#!/usr/bin/env bash
# Plain multi-node recipe (no SLURM, no TPU): start this once per node, each with its own PROCESS_ID.
#
#   COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=4 PROCESS_ID=$RANK launch/gpu/multinode.sh \
#       --config=configs/imagenet.py:L --workdir=/shared/runs/imagenet-L --mode=train \
#       --config.mesh.shape='(1,8,1)' --config.mesh.dcn_shape='(4,1,1)'
#
# runs `python -m latent_lm.main --coordinator_address=$COORDINATOR --num_processes=$NUM_PROCESSES
# --process_id=$PROCESS_ID <args>`. Layout: ONE PROCESS PER NODE, seeing all of the node's GPUs (with explicit
# flags JAX restricts no process to one GPU; CUDA_VISIBLE_DEVICES narrows it if needed). COORDINATOR is
# HOST:PORT of process 0's node, reachable from all nodes; process 0 listens there. The same command on every
# node resumes from the latest checkpoint after a failure. Environment: PYTHON (default: python).
set -euo pipefail
: "${COORDINATOR:?set COORDINATOR=HOST:PORT of process 0}"
: "${NUM_PROCESSES:?set NUM_PROCESSES (the number of nodes)}"
: "${PROCESS_ID:?set PROCESS_ID (0 … NUM_PROCESSES-1, this node)}"
if ! [[ "$NUM_PROCESSES" =~ ^[1-9][0-9]*$ && "$PROCESS_ID" =~ ^[0-9]+$ ]] || ((PROCESS_ID >= NUM_PROCESSES)); then
  echo "error: PROCESS_ID=$PROCESS_ID must be in [0, NUM_PROCESSES=$NUM_PROCESSES)" >&2
  exit 2
fi
if [[ "$COORDINATOR" != *:* ]]; then
  echo "error: COORDINATOR=$COORDINATOR must be HOST:PORT" >&2
  exit 2
fi
exec "${PYTHON:-python}" -m latent_lm.main --coordinator_address="$COORDINATOR" --num_processes="$NUM_PROCESSES" \
  --process_id="$PROCESS_ID" "$@"
