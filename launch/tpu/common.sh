# Shared settings and helpers of the TPU VM scripts (sourced, not run). Every setting is an environment variable:
#
#   TPU_NAME          TPU VM node name (required); with NUM_SLICES > 1 the node prefix: nodes $TPU_NAME-0 … -(N-1)
#   ZONE              zone of the TPU, e.g. us-east5-a                                                       (required)
#   PROJECT           GCP project                                        (default: the gcloud config's project)
#   QR_ID             queued-resource id                                                  (default: $TPU_NAME)
#   ACCELERATOR_TYPE  slice type, e.g. v5p-128, v5litepod-256, v6e-256, v4-64                  (default: v5p-8)
#   RUNTIME_VERSION   TPU VM image             (default: from ACCELERATOR_TYPE, e.g. v5p → v2-alpha-tpuv5)
#   NUM_SLICES        slices of a multislice job over the data-centre network                      (default: 1)
#   PROVISIONING      "" (on demand), spot, best-effort or reserved                                   (default: "")
#   REPO_URL, BRANCH  setup.sh clones this repo/branch on every worker; empty REPO_URL copies this checkout
#                     (its git-tracked and untracked, not ignored, files)               (default: "", main)
#   REMOTE_DIR        checkout on every worker, relative to $HOME                          (default: latent_lm)
#   RUN_NAME          run.sh/logs.sh/stop.sh: name of the run; logs and pid in $HOME/$LOG_DIR/$RUN_NAME.*
#                                                                                             (default: run)
#   LOG_DIR           per-worker log directory, relative to $HOME                     (default: latent_lm_logs)
#   WORKDIR           by convention the gs:// run directory passed as --workdir (read by no script)
#   SSH_FLAGS         extra flags for `gcloud compute tpus tpu-vm ssh/scp`, e.g. "--internal-ip"   (default: "")
#   DRY_RUN=1         print the gcloud commands instead of running them

set -euo pipefail

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
QR_ID=${QR_ID:-$TPU_NAME}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5p-8}
NUM_SLICES=${NUM_SLICES:-1}
PROVISIONING=${PROVISIONING:-}
REPO_URL=${REPO_URL:-}
BRANCH=${BRANCH:-main}
REMOTE_DIR=${REMOTE_DIR:-latent_lm}
RUN_NAME=${RUN_NAME:-run}
LOG_DIR=${LOG_DIR:-latent_lm_logs}
SSH_FLAGS=${SSH_FLAGS:-}
DRY_RUN=${DRY_RUN:-0}

die() {
  echo "error: $*" >&2
  exit 2
}

default_runtime_version() {
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v4-*) echo tpu-ubuntu2204-base ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$1; set RUNTIME_VERSION" ;;
  esac
}

# Names end up unquoted in remote paths: keep them to a safe alphabet.
check_settings() {
  [[ -n "$TPU_NAME" ]] || die "set TPU_NAME (the TPU VM name, or the node prefix when NUM_SLICES > 1)"
  [[ -n "$ZONE" ]] || die "set ZONE (e.g. us-east5-a)"
  [[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES=$NUM_SLICES must be a positive integer"
  local name
  for name in RUN_NAME LOG_DIR REMOTE_DIR; do
    [[ "${!name}" =~ ^[A-Za-z0-9._=+/-]+$ ]] || die "$name=${!name} may hold only letters, digits and ._=+/-"
  done
}

# gcloud, or its command line printed (shell-quoted) when DRY_RUN=1.
gcloud_run() {
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '%q ' gcloud "$@"
    printf '\n'
  else
    gcloud "$@"
  fi
}

location_flags() {
  LOCATION=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then LOCATION+=(--project="$PROJECT"); fi
}

# The TPU VM nodes: one per slice.
nodes() {
  if ((NUM_SLICES > 1)); then
    local i
    for ((i = 0; i < NUM_SLICES; i++)); do echo "$TPU_NAME-$i"; done
  else
    echo "$TPU_NAME"
  fi
}

# ssh_all COMMAND: runs the bash COMMAND on every worker of every slice (gcloud --worker=all per node).
ssh_all() {
  local node
  location_flags
  # shellcheck disable=SC2086  # SSH_FLAGS is a list of flags
  for node in $(nodes); do
    gcloud_run compute tpus tpu-vm ssh "$node" "${LOCATION[@]}" --worker=all $SSH_FLAGS --command="$1"
  done
}

# ssh_one NODE WORKER COMMAND
ssh_one() {
  location_flags
  # shellcheck disable=SC2086
  gcloud_run compute tpus tpu-vm ssh "$1" "${LOCATION[@]}" --worker="$2" $SSH_FLAGS --command="$3"
}

# Remote paths: $HOME is expanded on the worker.
REMOTE_LOG="\$HOME/$LOG_DIR/$RUN_NAME.log"
REMOTE_PID="\$HOME/$LOG_DIR/$RUN_NAME.pid"
