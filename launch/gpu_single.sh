#!/usr/bin/env bash
# Debug a distillation run on one NVIDIA GPU (default: configs/debug.py on the demo shards).
#
#   launch/gpu_single.sh [--config configs/debug.py] [--workdir /tmp/xmag_gpu] [--data demo_out/pairs] \
#       [--gpu 0] [--mem_fraction 0.75 | --nopreallocate] [--nondeterministic] [--install] [--dry_run] [-- ARGS]
#
# XLA flags: deterministic GPU ops (reproducible reductions and scatters, a little slower) unless
# --nondeterministic; the JAX allocator takes --mem_fraction of the GPU's memory up front, or allocates on
# demand with --nopreallocate (slower, but leaves room for other processes). ARGS go to xmag_jax.train.
set -euo pipefail

CONFIG=configs/debug.py WORKDIR=/tmp/xmag_gpu DATA="" GPU=0 MEM_FRACTION=0.75 PREALLOCATE=1 DETERMINISTIC=1
INSTALL=0 JAX_EXTRA=cuda13 PYTHON="${PYTHON:-.venv/bin/python}" DRY=0 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --data) DATA="$2"; shift 2 ;;
    --gpu) GPU="$2"; shift 2 ;;
    --mem_fraction) MEM_FRACTION="$2"; shift 2 ;;
    --nopreallocate) PREALLOCATE=0; shift ;;
    --nondeterministic) DETERMINISTIC=0; shift ;;
    --install) INSTALL=1; shift ;;
    --jax_extra) JAX_EXTRA="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --dry_run) DRY=1; shift ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu_single.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "gpu_single.sh: $*" >&2; exit 2; }
[[ "$GPU" =~ ^[0-9]+$ ]] || die "--gpu takes one GPU index, got '$GPU'"
[[ "$MEM_FRACTION" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem_fraction must be in (0, 1], got '$MEM_FRACTION'"
[[ -f "$CONFIG" ]] || (( DRY )) || die "config file '$CONFIG' not found"

run() {  # print (dry run) or execute one command
  if (( DRY )); then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}

if (( INSTALL )); then
  run python3 -m venv .venv
  run .venv/bin/pip install -q -e ".[test]" "jax[$JAX_EXTRA]"
fi

XLA_FLAGS_GPU="${XLA_FLAGS:-}"
(( DETERMINISTIC )) && XLA_FLAGS_GPU="${XLA_FLAGS_GPU:+$XLA_FLAGS_GPU }--xla_gpu_deterministic_ops=true"
ENV=(env "CUDA_VISIBLE_DEVICES=$GPU" JAX_PLATFORMS=cuda)
if (( PREALLOCATE )); then
  ENV+=("XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")
else
  ENV+=(XLA_PYTHON_CLIENT_PREALLOCATE=false)
fi
[[ -n "$XLA_FLAGS_GPU" ]] && ENV+=("XLA_FLAGS=$XLA_FLAGS_GPU")

TRAIN=("$PYTHON" -m xmag_jax.train --config "$CONFIG" --workdir "$WORKDIR")
[[ -n "$DATA" ]] && TRAIN+=("--config.data.dir=$DATA")
run "${ENV[@]}" "${TRAIN[@]}" "${EXTRA[@]}"
