#!/usr/bin/env bash
# Cloud TPU VM lifecycle for fmjax: create a (multi-host) TPU VM, run the same command on every worker, follow
# the logs, stop, delete. The run directory lives in a Cloud Storage bucket mounted on every worker with gcsfuse, so
# checkpoints survive the VM and every host sees the same files.
#
#   export TPU_NAME=fmjax-v5p ZONE=us-east5-a PROJECT=my-project ACCELERATOR=v5p-16 BUCKET=my-bucket
#   launch/tpu_vm.sh create                       # VM + fmjax on every worker + the bucket at /mnt/$BUCKET
#   launch/tpu_vm.sh run --config=configs/pretrain.py --config.model.name=1b --config.train.batch_size=256
#   launch/tpu_vm.sh logs                         # follow worker 0's log (the only one that logs metrics)
#   launch/tpu_vm.sh stop                         # SIGTERM: every worker saves a checkpoint and exits
#   launch/tpu_vm.sh run --config=...             # the same RUN name resumes from its newest checkpoint
#   launch/tpu_vm.sh delete
#
# Settings (environment): TPU_NAME, ZONE, PROJECT (default: gcloud's), ACCELERATOR (e.g. v4-8, v5p-16,
# v5litepod-16, v6e-16), RUNTIME (TPU software version; default by generation), BUCKET (required for run), RUN (run
# name = directory under /mnt/$BUCKET/fmjax; default 'run'), REPO_URL and REF (what to install; default this
# checkout's origin and commit), SPOT=1 (spot capacity), DRY_RUN=1 (print the gcloud commands instead of running).
# jax.distributed starts by itself on every worker of a multi-host slice: no coordinator flags are needed.
set -euo pipefail

TPU_NAME="${TPU_NAME:-fmjax}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUN="${RUN:-run}"
BUCKET="${BUCKET:-}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_URL="${REPO_URL:-$(git -C "$here" remote get-url origin 2>/dev/null || echo https://github.com/fmjax/fmjax.git)}"
REF="${REF:-$(git -C "$here" rev-parse HEAD 2>/dev/null || echo main)}"

default_runtime() {
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "unknown ACCELERATOR=$1; set RUNTIME to its TPU software version" >&2; return 1 ;;
  esac
}
RUNTIME="${RUNTIME:-$(default_runtime "$ACCELERATOR")}"

gcloud_tpu() {  # gcloud compute tpus tpu-vm ARGS, or its echo under DRY_RUN=1
  local cmd=(gcloud compute tpus tpu-vm "$@" --zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then cmd+=(--project="$PROJECT"); fi
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
}

on_workers() {  # on_workers WORKER SCRIPT: run SCRIPT with bash on worker WORKER (a number or 'all')
  gcloud_tpu ssh "$TPU_NAME" --worker="$1" --command="bash -c $(printf '%q' "$2")"
}

need_bucket() {
  if [[ -z "$BUCKET" ]]; then
    echo "set BUCKET to a Cloud Storage bucket (without gs://): the run directory lives in it" >&2
    exit 2
  fi
}

setup_script() {  # what every worker runs once: gcsfuse + the bucket, fmjax in a venv
  cat <<EOF
set -euo pipefail
if ! command -v gcsfuse >/dev/null; then
  echo "deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse python3-venv
fi
sudo mkdir -p /mnt/$BUCKET && sudo chown "\$USER" /mnt/$BUCKET
mountpoint -q /mnt/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/$BUCKET
[[ -d ~/fmjax ]] || git clone -q $REPO_URL ~/fmjax
git -C ~/fmjax fetch -q origin && git -C ~/fmjax checkout -q $REF
[[ -d ~/venv ]] || python3 -m venv ~/venv
~/venv/bin/pip install -q --upgrade pip
~/venv/bin/pip install -q -e ~/fmjax'[tpu]'
EOF
}

run_script() {  # start the run on a worker, detached; the same command on all of them
  local args
  args="$(printf '%q ' "$@")"
  cat <<EOF
set -euo pipefail
mkdir -p /mnt/$BUCKET/fmjax
cd ~/fmjax
nohup ~/venv/bin/python -m fmjax.main --workdir=/mnt/$BUCKET/fmjax/$RUN $args > ~/fmjax-$RUN.log 2>&1 &
echo "started on \$(hostname): log ~/fmjax-$RUN.log, run directory /mnt/$BUCKET/fmjax/$RUN"
EOF
}

usage() {
  sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

command="${1:-}"
shift || true
case "$command" in
  create)
    need_bucket
    create=(create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME")
    if [[ "${SPOT:-0}" == 1 ]]; then create+=(--spot); fi
    gcloud_tpu "${create[@]}"
    on_workers all "$(setup_script)"
    ;;
  setup)  # re-install (e.g. another REF) without re-creating the VM
    need_bucket
    on_workers all "$(setup_script)"
    ;;
  run)
    need_bucket
    if [[ $# -eq 0 ]]; then echo "run needs fmjax.main flags, e.g. --config=configs/pretrain.py" >&2; exit 2; fi
    on_workers all "$(run_script "$@")"
    ;;
  logs)
    on_workers 0 "tail -n 200 -F ~/fmjax-$RUN.log"
    ;;
  stop)
    on_workers all "pkill -TERM -f 'python -m fmjax.main' || true"
    ;;
  ssh)
    gcloud_tpu ssh "$TPU_NAME" --worker="${1:-0}"
    ;;
  delete)
    gcloud_tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    usage
    [[ "$command" == help || "$command" == -h || "$command" == --help ]] || exit 2
    ;;
esac
