#!/usr/bin/env bash
# Deletes the queued resource and its TPU VM node(s) (all slices). Settings: see common.sh (QR_ID or TPU_NAME,
# ZONE, PROJECT, DRY_RUN).
#
#   TPU_NAME=lm ZONE=us-east5-a launch/tpu/delete.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_settings
location_flags
# --force deletes the nodes together with the request; --quiet skips the confirmation prompt.
gcloud_run compute tpus queued-resources delete "$QR_ID" "${LOCATION[@]}" --force --quiet
