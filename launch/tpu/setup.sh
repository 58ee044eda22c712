#!/usr/bin/env bash
# Puts the code on every worker of every slice and installs it: a checkout in $HOME/$REMOTE_DIR (git clone of
# REPO_URL@BRANCH, or a copy of this checkout when REPO_URL is empty), a virtualenv .venv in it, `pip install -e '.[tpu]'`
# (jax[tpu] pinned by setup.py). Re-running updates the code and the install. Settings: see common.sh and
#   JAX_PIP    a JAX requirement replacing the pinned one (default: none: the project's `tpu` extra,
#              jax[tpu] at the version the project is tested with, whose libtpu matches it; setup.py)
#   EXTRA_PIP  more pip requirements, e.g. "gcsfs"      (default: "")
#
#   TPU_NAME=lm ZONE=us-east5-a REPO_URL=https://github.com/me/latent-lm BRANCH=main launch/tpu/setup.sh
#   TPU_NAME=lm ZONE=us-east5-a launch/tpu/setup.sh          # copies this checkout instead
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_settings
JAX_PIP=${JAX_PIP:-}
EXTRA_PIP=${EXTRA_PIP:-}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dir=$(printf '%q' "$REMOTE_DIR")

if [[ -n "$REPO_URL" ]]; then
  url=$(printf '%q' "$REPO_URL")
  branch=$(printf '%q' "$BRANCH")
  fetch="if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin $branch"
  fetch+=" && git -C $dir checkout --quiet -B $branch FETCH_HEAD; else git clone --quiet --branch $branch $url $dir; fi"
else
  # This checkout's files as git sees them (tracked + untracked, minus .gitignore: no .venv, no runs/).
  archive=$(mktemp -t latent_lm_src.XXXXXX.tgz)
  trap 'rm -f "$archive"' EXIT
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard |
      xargs -0 tar -czf "$archive" --ignore-failed-read --)
  else
    tar -czf "$archive" -C "$REPO_ROOT" --exclude=.venv --exclude=runs --exclude=.git .
  fi
  location_flags
  # shellcheck disable=SC2086
  for node in $(nodes); do
    gcloud_run compute tpus tpu-vm scp "$archive" "$node:latent_lm_src.tgz" "${LOCATION[@]}" --worker=all $SSH_FLAGS
  done
  fetch="mkdir -p $dir && tar -xzf latent_lm_src.tgz -C $dir && rm latent_lm_src.tgz"
fi

pips=""
[[ -n "$JAX_PIP" ]] && pips=$(printf '%q ' "$JAX_PIP")
for p in $EXTRA_PIP; do pips+=$(printf '%q ' "$p"); done
# Some TPU VM images ship python3 without the venv module: install it once.
ssh_all "set -euo pipefail; cd \$HOME; $fetch; cd $dir
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv ||
    { sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv --clear .venv; }
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[tpu]' $pips
.venv/bin/python -c 'import jax, latent_lm; print(\"\$(hostname): jax\", jax.__version__, \"installed\")'"
