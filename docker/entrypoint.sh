#!/usr/bin/env bash
# memrec container entrypoint: one image, three jobs.
#
#   serve    serve MEMREC_MODEL_DIR (train it first when MEMREC_TRAIN_IF_MISSING=true and none is there)
#   train    train MEMREC_DATASET from MEMREC_DATA_DIR into MEMREC_MODEL_DIR unless a model is already
#            there, then, when a Redis store is configured, load its memory bank into the store (reindex)
#   reindex  load the model's memory bank into the store and write an index snapshot
#   other    run as a command (e.g. `memrec evaluate --model /models/current`, `bash`)
#
# Settings are MEMREC_* environment variables (docs/configuration.md). Training writes into
# a sibling folder and renames it into place when complete, so a killed run never leaves a half model
# that `serve` would pick up; rerunning resumes from the last epoch's checkpoint.
#
# Data-parallel training over several pods (docs/deployment.md#distributed-training): where torchrun's
# own variables are set (PET_NNODES, PET_NPROC_PER_NODE, PET_RDZV_BACKEND, PET_RDZV_ENDPOINT, ...),
# `train` runs memrec under torchrun. Every pod of the Indexed Job trains its share; only the pod of
# index 0 (JOB_COMPLETION_INDEX) moves the finished model into place and reindexes.
set -euo pipefail

MEMREC="${MEMREC_BIN:-memrec}"  # the command; tests point it at a checkout's virtual environment
export MEMREC_MODEL_DIR="${MEMREC_MODEL_DIR:-/models/current}"
export MEMREC_DATA_DIR="${MEMREC_DATA_DIR:-/data}"
MEMREC_DATASET="${MEMREC_DATASET:-ml-100k}"
MEMREC_TRAIN_ARGS="${MEMREC_TRAIN_ARGS:-}"
MEMREC_TRAIN_IF_MISSING="${MEMREC_TRAIN_IF_MISSING:-false}"

say() { echo "entrypoint: $*" >&2; }

have_model() { [[ -f "$MEMREC_MODEL_DIR/config.json" ]]; }

# The pod that finishes a training run: the only one, or index 0 of an Indexed Job's pods.
first_pod() { [[ "${JOB_COMPLETION_INDEX:-0}" == "0" ]]; }

fetch_movielens_if_missing() {
  if [[ "$MEMREC_DATASET" == "ml-100k" && ! -f "$MEMREC_DATA_DIR/ml-100k/ml-100k.inter" ]]; then
    say "no ml-100k under $MEMREC_DATA_DIR; fetching it from GroupLens"
    python3 -m service.movielens --data-dir "$MEMREC_DATA_DIR"
  fi
}

train_if_missing() {
  if have_model; then
    say "model found in $MEMREC_MODEL_DIR; not training"
    return 0
  fi
  fetch_movielens_if_missing
  local partial="${MEMREC_MODEL_DIR%/}.partial"
  local launch=("$MEMREC")
  if [[ -n "${PET_NNODES:-}" ]]; then
    # torchrun reads its flags from the PET_* variables; it starts memrec once per process
    launch=(torchrun --no-python "$MEMREC")
    say "training $MEMREC_DATASET under torchrun: $PET_NNODES node(s), rendezvous ${PET_RDZV_ENDPOINT:-local}"
  else
    say "training $MEMREC_DATASET into $MEMREC_MODEL_DIR"
  fi
  # shellcheck disable=SC2086  # MEMREC_TRAIN_ARGS is a list of flags, split on purpose
  "${launch[@]}" train --dataset "$MEMREC_DATASET" --data-dir "$MEMREC_DATA_DIR" --out "$partial" --resume \
    $MEMREC_TRAIN_ARGS >&2  # its metrics are a log line here; stdout carries the reindex summary
  if ! first_pod; then
    # rank 0 wrote the model before every process left training: pod 0 finishes it
    say "pod $JOB_COMPLETION_INDEX trained its share; pod 0 moves the model into place"
    return 0
  fi
  rm -rf "$partial/checkpoints"
  if have_model; then  # another trainer finished first: keep theirs
    rm -rf "$partial"
  else
    mv "$partial" "$MEMREC_MODEL_DIR"
  fi
}

cmd="${1:-serve}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  serve)
    if ! have_model; then
      if [[ "$MEMREC_TRAIN_IF_MISSING" == "true" ]]; then
        train_if_missing
      else
        say "no model in $MEMREC_MODEL_DIR: run the 'train' command first or set MEMREC_TRAIN_IF_MISSING=true"
        exit 2
      fi
    fi
    exec "$MEMREC" serve "$@"
    ;;
  train)
    train_if_missing
    if [[ -n "${MEMREC_REDIS_URL:-}" ]] && first_pod; then
      exec "$MEMREC" reindex "$@"
    fi
    ;;
  reindex)
    exec "$MEMREC" reindex "$@"
    ;;
  *)
    exec "$cmd" "$@"
    ;;
esac
