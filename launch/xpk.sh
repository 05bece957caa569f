#!/usr/bin/env bash
# GKE recipe with xpk (pip install xpk): a TPU cluster of one or more slices, a Cloud Storage bucket mounted in
# every pod, and fmjax runs as workloads (one JobSet per run; multi-slice runs get the DCN mesh axes).
#
#   export CLUSTER=fmjax ZONE=us-east5-a PROJECT=my-project ACCELERATOR=v5p-128 NUM_SLICES=2 BUCKET=my-bucket
#   launch/xpk.sh cluster                         # the GKE cluster (once) and the bucket attached at /mnt/$BUCKET
#   launch/xpk.sh run --config=configs/pretrain.py --config.model.name=llama3_8b --config.train.batch_size=512
#   launch/xpk.sh list                            # workloads and their state
#   launch/xpk.sh logs                            # where to read them
#   launch/xpk.sh stop                            # delete the workload (a resubmitted RUN resumes)
#   launch/xpk.sh delete-cluster
#
# Settings (environment): CLUSTER, ZONE, PROJECT, ACCELERATOR (xpk --tpu-type, e.g. v5p-128, v5litepod-256,
# v6e-256), NUM_SLICES (default 1), BUCKET (required), RUN (workload name and run directory
# /mnt/$BUCKET/fmjax/$RUN; default fmjax-run), IMAGE (base docker image; default python:3.11), CAPACITY (xpk
# capacity flag: --on-demand, --spot or --reservation=NAME; default --on-demand), DRY_RUN=1 (print the commands).
# xpk builds an image of this checkout (--script-dir) on top of IMAGE; each pod installs fmjax[tpu] and starts
# `python -m fmjax.main`, and jax.distributed starts by itself on every host of every slice.
set -euo pipefail

CLUSTER="${CLUSTER:-fmjax}"
ZONE="${ZONE:-us-east5-a}"
ACCELERATOR="${ACCELERATOR:-v5p-8}"
NUM_SLICES="${NUM_SLICES:-1}"
RUN="${RUN:-fmjax-run}"
IMAGE="${IMAGE:-python:3.11}"
CAPACITY="${CAPACITY:---on-demand}"
BUCKET="${BUCKET:-}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

xpk_() {  # xpk ARGS with the cluster's location, or its echo under DRY_RUN=1
  local cmd=(xpk "$@" --cluster="$CLUSTER" --zone="$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then cmd+=(--project="$PROJECT"); fi
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
}

need_bucket() {
  if [[ -z "$BUCKET" ]]; then
    echo "set BUCKET to a Cloud Storage bucket (without gs://): the run directory lives in it" >&2
    exit 2
  fi
}

command="${1:-}"
shift || true
case "$command" in
  cluster)
    need_bucket
    xpk_ cluster create --tpu-type="$ACCELERATOR" --num-slices="$NUM_SLICES" "$CAPACITY"
    xpk_ storage attach "$BUCKET" --type=gcsfuse --bucket="$BUCKET" --mount-point="/mnt/$BUCKET" \
      --readonly=false --auto-mount=true --size=64
    ;;
  run)
    need_bucket
    if [[ $# -eq 0 ]]; then echo "run needs fmjax.main flags, e.g. --config=configs/pretrain.py" >&2; exit 2; fi
    args="$(printf '%q ' "$@")"
    xpk_ workload create --workload="$RUN" --tpu-type="$ACCELERATOR" --num-slices="$NUM_SLICES" \
      --base-docker-image="$IMAGE" --script-dir="$here" \
      --command="pip install -q -e '.[tpu]' && python -m fmjax.main --workdir=/mnt/$BUCKET/fmjax/$RUN $args"
    ;;
  list)
    xpk_ workload list
    ;;
  logs)
    echo "Cloud Logging: resource.type=\"k8s_container\" labels.\"k8s-pod/jobset_sigs_k8s_io/jobset-name\"=\"$RUN\";"
    echo "or: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$RUN --max-log-requests=64 (worker 0 logs metrics)"
    ;;
  stop)
    xpk_ workload delete --workload="$RUN"
    ;;
  delete-cluster)
    xpk_ cluster delete
    ;;
  *)
    sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    [[ "$command" == help || "$command" == -h || "$command" == --help ]] || exit 2
    ;;
esac
