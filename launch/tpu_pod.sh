#!/usr/bin/env bash
# Distil on a Cloud TPU pod slice: create the TPU VM(s), ship the code, install, train on every worker.
#
#   launch/tpu_pod.sh --name xmag-uni2h --zone us-east5-a --accelerator v5p-256 \
#       --config configs/uni2h_vits14.py --data gs://BUCKET/pairs --workdir gs://BUCKET/runs/uni2h [--dry_run]
#
# Steps (default: all = create code install train): create | code | install | train | status | logs | delete.
# The workdir is a gs:// path (written through etils.epath). Pair shards are ArrayRecord files, which the input
# pipeline reads as local files: --data gs://BUCKET/DIR is mounted with gcsfuse at /gcs/BUCKET on every worker.
# --dry_run prints every command instead of running it.
set -euo pipefail

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --name NAME              TPU VM name (queued resource NAME-qr; multislice nodes NAME-0, NAME-1, ...)
  --zone ZONE              e.g. us-east5-a (v5p), us-west4-a (v5e), us-east1-d (v6e)
  --project PROJECT        default: gcloud's configured project
  --accelerator TYPE       v4-128, v5p-256, v5litepod-256 (or v5e-256), v6e-256, ...
  --slices N               multislice over the data-centre network (queued resource with N nodes); default 1
  --runtime VERSION        TPU VM software version; default by generation
  --direct                 create the TPU VM directly instead of through a queued resource
  --spot                   spot capacity (queued resources only)
  --config PATH            ml_collections config, e.g. configs/uni2h_vits14.py
  --data GS_DIR            pair shards (data_prep output): gs://BUCKET/DIR (mounted with gcsfuse at /gcs/BUCKET,
                           --config.data.dir=/gcs/BUCKET/DIR) or /gcs/BUCKET/DIR with --gcsfuse BUCKET
  --gcsfuse BUCKET         install gcsfuse and mount gs://BUCKET at /gcs/BUCKET on every worker (install step)
  --workdir GS_DIR         checkpoints, logs
  --repo URL --ref REF     pull the code with git on the workers (default: copy `git archive HEAD` of this checkout)
  --dry_run                print the commands, run nothing
  -- ARGS                  passed on to `python -m xmag_jax.train`, e.g. -- --config.total_steps=1000
EOF
}

NAME="" ZONE="" PROJECT="" ACCEL="" SLICES=1 RUNTIME="" QUEUED=1 SPOT=0 CONFIG="" DATA="" WORKDIR=""
REPO="" REF="" FUSE_BUCKET="" DRY=0 STEPS=() EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --accelerator) ACCEL="$2"; shift 2 ;;
    --slices) SLICES="$2"; shift 2 ;;
    --runtime) RUNTIME="$2"; shift 2 ;;
    --direct) QUEUED=0; shift ;;
    --spot) SPOT=1; shift ;;
    --config) CONFIG="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --gcsfuse) FUSE_BUCKET="${2#gs://}"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --ref) REF="$2"; shift 2 ;;
    --dry_run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    create|code|install|train|status|logs|delete|all) STEPS+=("$1"); shift ;;
    *) echo "tpu_pod.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ ${#STEPS[@]} -gt 0 ]] || STEPS=(all)

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
[[ -n "$NAME" ]] || die "--name is required"
[[ -n "$ZONE" ]] || die "--zone is required"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--slices must be a positive integer, got '$SLICES'"
if [[ " ${STEPS[*]} " =~ \ (all|create)\  ]]; then
  [[ -n "$ACCEL" ]] || die "--accelerator is required to create the TPU"
fi
if [[ "$DATA" == gs://* ]]; then  # array_record reads local files: read the bucket through a gcsfuse mount
  DATA_BUCKET="${DATA#gs://}"; DATA_BUCKET="${DATA_BUCKET%%/*}"
  [[ -z "$FUSE_BUCKET" || "$FUSE_BUCKET" == "$DATA_BUCKET" ]] ||
    die "--data $DATA is in bucket $DATA_BUCKET but --gcsfuse mounts $FUSE_BUCKET"
  FUSE_BUCKET="$DATA_BUCKET"
  DATA="/gcs/${DATA#gs://}"
fi
if [[ " ${STEPS[*]} " =~ \ (all|train)\  ]]; then
  [[ -n "$CONFIG" ]] || die "--config is required to train"
  [[ -n "$FUSE_BUCKET" && "$DATA" == "/gcs/$FUSE_BUCKET/"* ]] ||
    die "--data must be gs://BUCKET/DIR on a pod (every worker reads it, through gcsfuse), or /gcs/BUCKET/... with --gcsfuse BUCKET, got '$DATA'"
  [[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// directory on a pod (one checkpoint for all workers), got '$WORKDIR'"
fi
[[ -z "$REPO" || -n "$REF" ]] || die "--repo needs --ref (a branch, tag or commit)"
(( SLICES == 1 || QUEUED )) || die "--slices > 1 needs a queued resource (drop --direct)"

ACCEL="${ACCEL/v5e-/v5litepod-}"  # the Cloud name of v5e slices
if [[ -z "$RUNTIME" ]]; then
  case "$ACCEL" in
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    *) RUNTIME=tpu-ubuntu2204-base ;;
  esac
fi

GCLOUD=(gcloud)
[[ -n "$PROJECT" ]] && GCLOUD+=(--project "$PROJECT")
TPU=("${GCLOUD[@]}" compute tpus)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REMOTE_DIR=xmag_jax
TARBALL="/tmp/xmag_jax-${NAME}.tar.gz"

run() {  # print (dry run) or execute one command
  if (( DRY )); then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}

nodes() {
  if (( SLICES == 1 )); then echo "$NAME"; else for ((i = 0; i < SLICES; i++)); do echo "$NAME-$i"; done; fi
}

on_all_workers() {  # run a shell command on every worker of every node
  local node
  for node in $(nodes); do
    run "${TPU[@]}" tpu-vm ssh "$node" --zone "$ZONE" --worker=all --command "$1"
  done
}

step_create() {
  if (( ! QUEUED )); then
    run "${TPU[@]}" tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$ACCEL" --version "$RUNTIME"
    return
  fi
  local qr=(queued-resources create "$NAME-qr" --zone "$ZONE" --accelerator-type "$ACCEL" --runtime-version "$RUNTIME")
  if (( SLICES == 1 )); then qr+=(--node-id "$NAME"); else qr+=(--node-count "$SLICES" --node-prefix "$NAME"); fi
  (( SPOT )) && qr+=(--spot)
  run "${TPU[@]}" "${qr[@]}"
  local describe=("${TPU[@]}" queued-resources describe "$NAME-qr" --zone "$ZONE" --format='value(state.state)')
  if (( DRY )); then run "${describe[@]}"; return; fi
  local state
  until state="$("${describe[@]}")" && [[ "$state" == ACTIVE ]]; do
    case "$state" in FAILED|SUSPENDED) die "queued resource $NAME-qr is $state";; esac
    echo "queued resource $NAME-qr: ${state:-unknown}; waiting" >&2
    sleep 60
  done
}

step_code() {
  if [[ -n "$REPO" ]]; then
    local repo ref
    repo="$(printf '%q' "$REPO")" ref="$(printf '%q' "$REF")"
    on_all_workers "rm -rf $REMOTE_DIR && git init -q $REMOTE_DIR && git -C $REMOTE_DIR fetch -q --depth 1 $repo $ref && git -C $REMOTE_DIR checkout -q FETCH_HEAD"
    return
  fi
  run git -C "$ROOT" archive --format=tar.gz --output="$TARBALL" HEAD
  local node
  for node in $(nodes); do
    run "${TPU[@]}" tpu-vm scp "$TARBALL" "$node:xmag_jax.tar.gz" --zone "$ZONE" --worker=all
  done
  on_all_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf xmag_jax.tar.gz -C $REMOTE_DIR"
}

step_install() {
  on_all_workers "cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e . 'jax[tpu]'"
  if [[ -n "$FUSE_BUCKET" ]]; then
    # Cloud Storage FUSE from Google's apt repository; the bucket appears at /gcs/BUCKET on every worker.
    on_all_workers "command -v gcsfuse >/dev/null || { echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null && sudo apt-get update -q && sudo apt-get install -yq gcsfuse; } && sudo mkdir -p /gcs/$FUSE_BUCKET && sudo chown \$(id -u):\$(id -g) /gcs/$FUSE_BUCKET && (mountpoint -q /gcs/$FUSE_BUCKET || gcsfuse --implicit-dirs $FUSE_BUCKET /gcs/$FUSE_BUCKET)"
  fi
}

train_command() {
  local args=(.venv/bin/python -m xmag_jax.train --distributed --config "$CONFIG" --workdir "$WORKDIR" "--config.data.dir=$DATA" "${EXTRA[@]}")
  # Every worker runs the same command; --distributed: jax.distributed.initialize() finds the coordinator
  # and this worker's index from the TPU metadata. Output goes to train.log on each worker (`logs` shows
  # worker 0's) and metrics to the workdir.
  printf 'cd %s && nohup %s > train.log 2>&1 < /dev/null &' "$REMOTE_DIR" "$(printf '%q ' "${args[@]}" | sed 's/ $//')"
}

step_train() { on_all_workers "$(train_command)"; }

step_status() {
  if (( QUEUED )); then run "${TPU[@]}" queued-resources describe "$NAME-qr" --zone "$ZONE"; fi
  on_all_workers "pgrep -fa 'xmag_jax.train' || echo 'not training'"
}

step_logs() {
  local node
  for node in $(nodes); do
    run "${TPU[@]}" tpu-vm ssh "$node" --zone "$ZONE" --worker=0 --command "tail -n 50 $REMOTE_DIR/train.log"
  done
}

step_delete() {
  if (( QUEUED )); then
    run "${TPU[@]}" queued-resources delete "$NAME-qr" --zone "$ZONE" --force --quiet
  else
    run "${TPU[@]}" tpu-vm delete "$NAME" --zone "$ZONE" --quiet
  fi
}

for step in "${STEPS[@]}"; do
  case "$step" in
    all) step_create; step_code; step_install; step_train ;;
    *) "step_$step" ;;
  esac
done
