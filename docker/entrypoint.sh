#!/usr/bin/env bash
# memrec container entrypoint: one image, three jobs.
#
#   serve    serve MEMREC_MODEL_DIR (train it first when MEMREC_TRAIN_IF_MISSING=true and none is there)
#   train    train MEMREC_DATASET from MEMREC_DATA_DIR into MEMREC_MODEL_DIR unless a model is already
#            there, then, when a Redis store is configured, load its memory bank into the store (reindex)
#   reindex  load the model's memory bank into the store and write an index snapshot
#   retrain  export the store's interaction log after the current model's training data, train a new
#            model on it warm from the current one (MEMREC_RETRAIN_ARGS), load its memory bank into its
#            own namespace of the store and publish it (docs/deployment.md#the-retrain-loop)
#   other    run as a command (e.g. `memrec evaluate --model /models/current`, `bash`)
#
# Settings are MEMREC_* environment variables (docs/configuration.md). Training writes into
# a sibling folder and moves it into place when complete, so a killed run never leaves a half model
# that `serve` would pick up; rerunning resumes from the last epoch's checkpoint.
#
# Model versions: next to MEMREC_MODEL_DIR (/models/current) live versions/<UTC time>/ (one model
# directory each), exports/<UTC time>.inter (the data each retrained version was trained on) and
# MEMREC_MODEL_DIR itself, a relative symbolic link to the version served. Publishing a version
# renames a new link over it: atomic, so a server starting meanwhile reads the old version or the
# new one, never neither. The newest MEMREC_KEEP_VERSIONS (default 3) versions and exports are kept.
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
MEMREC_RETRAIN_ARGS="${MEMREC_RETRAIN_ARGS:-$MEMREC_TRAIN_ARGS}"
MEMREC_KEEP_VERSIONS="${MEMREC_KEEP_VERSIONS:-3}"
(( MEMREC_KEEP_VERSIONS >= 1 )) || MEMREC_KEEP_VERSIONS=1  # the served version is never removed
MODELS="$(dirname "$MEMREC_MODEL_DIR")"

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
    publish "$partial"
  fi
}

stamp() { date -u "$@" +%Y%m%dT%H%M%SZ; }

# publish DIR [NAME]: move a finished model directory to versions/NAME (default: the UTC time) and
# point MEMREC_MODEL_DIR at it
publish() {
  local name="${2:-$(stamp)}"
  if [[ -e "$MODELS/versions/$name" ]]; then name="$name-$$"; fi
  mkdir -p "$MODELS/versions"
  mv -T "$1" "$MODELS/versions/$name"
  if [[ -d "$MEMREC_MODEL_DIR" && ! -L "$MEMREC_MODEL_DIR" ]]; then
    # a model directory written before versions were kept becomes one, named by its training time (a
    # server starting in the moment before the link takes its place finds no model and is restarted)
    local first
    first="$MODELS/versions/$(stamp -r "$MEMREC_MODEL_DIR/config.json")"
    say "moving $MEMREC_MODEL_DIR to $first"
    mv -T "$MEMREC_MODEL_DIR" "$first"
  fi
  ln -sfn "versions/$name" "$MEMREC_MODEL_DIR.next"
  mv -T "$MEMREC_MODEL_DIR.next" "$MEMREC_MODEL_DIR"
  say "published $MODELS/versions/$name as $MEMREC_MODEL_DIR"
}

# prune FOLDER PATTERN: delete all but the newest MEMREC_KEEP_VERSIONS entries (never the one served)
prune() {
  local served entries
  served="$(readlink -f "$MEMREC_MODEL_DIR")"
  mapfile -t entries < <(find "$1" -mindepth 1 -maxdepth 1 -name "$2" ! -name '*.partial' | sort)
  local excess=$(( ${#entries[@]} - MEMREC_KEEP_VERSIONS ))
  for ((i = 0; i < excess; i++)); do
    if [[ "$(readlink -f "${entries[$i]}")" != "$served" ]]; then
      say "removing ${entries[$i]}"
      rm -rf "${entries[$i]}"
    fi
  done
}

# The retrain loop: export → train warm → reindex → publish. The export reads the store the served
# version writes (its namespace), so each version needs its own: MEMREC_NAMESPACE must stay unset.
retrain() {
  if ! have_model; then
    say "no model in $MEMREC_MODEL_DIR to retrain from: run the 'train' command first"
    exit 2
  fi
  if [[ -n "${MEMREC_NAMESPACE:-}" ]]; then
    say "retrain needs a store namespace per model version: unset MEMREC_NAMESPACE"
    exit 2
  fi
  local name data partial
  name="$(stamp)"
  data="$MODELS/exports/$name.inter"
  partial="$MODELS/versions/$name.partial"
  mkdir -p "$MODELS/exports" "$MODELS/versions"
  rm -rf "$MODELS"/versions/*.partial "$MODELS"/exports/*.partial  # a failed earlier run's
  say "exporting the interaction log of $(readlink -f "$MEMREC_MODEL_DIR") with its training data"
  "$MEMREC" export --out "$data" --with-training-data --data-dir "$MEMREC_DATA_DIR" >&2
  say "training on $data, warm from $MEMREC_MODEL_DIR"
  # shellcheck disable=SC2086  # MEMREC_RETRAIN_ARGS is a list of flags, split on purpose
  if ! "$MEMREC" train --dataset "$data" --out "$partial" --init-from "$MEMREC_MODEL_DIR" \
    $MEMREC_RETRAIN_ARGS >&2; then
    rm -rf "$partial" "$data"  # nothing of a failed run stays: the served version is unchanged
    say "training failed; $MEMREC_MODEL_DIR is unchanged"
    exit 1
  fi
  rm -rf "$partial/checkpoints"
  # its bank into its own namespace before any server reads the new version
  if [[ -n "${MEMREC_REDIS_URL:-}" ]] && ! MEMREC_MODEL_DIR="$partial" "$MEMREC" reindex; then
    rm -rf "$partial" "$data"
    say "reindex failed; $MEMREC_MODEL_DIR is unchanged"
    exit 1
  fi
  publish "$partial" "$name"
  prune "$MODELS/versions" '*'
  prune "$MODELS/exports" '*.inter'
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
  retrain)
    retrain
    ;;
  *)
    exec "$cmd" "$@"
    ;;
esac
