#!/usr/bin/env bash
# Requests a TPU VM slice (or NUM_SLICES slices for multislice) as a queued resource and, with WAIT=1, waits until
# it is ACTIVE. Settings: see common.sh (TPU_NAME, ZONE, PROJECT, QR_ID, ACCELERATOR_TYPE, RUNTIME_VERSION,
# NUM_SLICES, PROVISIONING, DRY_RUN) and:
#   WAIT=1                wait for ACTIVE, polling every POLL_SECONDS (default 1, 30)
#   VALID_UNTIL_DURATION  give up the request after this long, e.g. 6h (default: never)
#   CREATE_FLAGS          more flags for `queued-resources create`, e.g. "--network=my-net --reserved"
#
#   TPU_NAME=lm ZONE=us-east5-a ACCELERATOR_TYPE=v5p-128 PROVISIONING=spot launch/tpu/create.sh
#   TPU_NAME=lm ZONE=us-east5-a ACCELERATOR_TYPE=v5p-128 NUM_SLICES=4 launch/tpu/create.sh   # nodes lm-0 … lm-3
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_settings
RUNTIME_VERSION=${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}
WAIT=${WAIT:-1}
POLL_SECONDS=${POLL_SECONDS:-30}
VALID_UNTIL_DURATION=${VALID_UNTIL_DURATION:-}
CREATE_FLAGS=${CREATE_FLAGS:-}
location_flags

args=(compute tpus queued-resources create "$QR_ID" "${LOCATION[@]}" --accelerator-type="$ACCELERATOR_TYPE"
  --runtime-version="$RUNTIME_VERSION")
if ((NUM_SLICES > 1)); then
  # Multislice: the slices are created together, and the TPU runtime gives every worker the MEGASCALE_* settings
  # (coordinator, slice id, slice count) that jax.distributed reads; nothing is set by hand.
  args+=(--node-count="$NUM_SLICES" --node-prefix="$TPU_NAME")
else
  args+=(--node-id="$TPU_NAME")
fi
case "$PROVISIONING" in
  "") ;;
  spot | best-effort | reserved) args+=(--"$PROVISIONING") ;;
  *) die "PROVISIONING=$PROVISIONING must be empty (on demand), spot, best-effort or reserved" ;;
esac
if [[ -n "$VALID_UNTIL_DURATION" ]]; then args+=(--valid-until-duration="$VALID_UNTIL_DURATION"); fi
# shellcheck disable=SC2206  # CREATE_FLAGS is a list of flags
args+=($CREATE_FLAGS)
gcloud_run "${args[@]}"

if [[ "$WAIT" == "1" ]]; then
  describe=(compute tpus queued-resources describe "$QR_ID" "${LOCATION[@]}" --format='value(state.state)')
  if [[ "$DRY_RUN" == "1" ]]; then
    gcloud_run "${describe[@]}"
    exit 0
  fi
  while true; do
    state=$(gcloud "${describe[@]}")
    echo "$(date +%H:%M:%S) queued resource $QR_ID: $state"
    case "$state" in
      ACTIVE) break ;;
      FAILED | SUSPENDED | SUSPENDING)
        die "queued resource $QR_ID is $state (gcloud compute tpus queued-resources describe $QR_ID ${LOCATION[*]})" ;;
    esac
    sleep "$POLL_SECONDS"
  done
fi
