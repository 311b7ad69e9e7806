#!/usr/bin/env bash
# Reproduce the LoRM paper runs: the 18 (dataset, β) commands of the reference README (LORM_SPEC §10.5).
# See docs/PAPER_SETUP.md for how to obtain the datasets and the checkpoint.
#
# Environment variables:
#   VIT_NPZ          (required) big_vision ViT-B/16 AugReg in21k checkpoint, e.g.
#                    B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz (gs://vit_models/augreg/)
#   TFDS_DIR         (required) TFDS data_dir holding ArrayRecord copies of cifar100, imagenet_r, imagenet_a,
#                    caltech_birds2011, cars196, eurosat/rgb
#   CARS_MANUAL_DIR  (optional) folder with the original Stanford Cars files, used instead of a prepared cars196 copy
#   RUNS             (optional) output root, default runs/paper  (each run: $RUNS/<dataset>_b<β>)
#   ONLY             (optional) space-separated dataset names to run, e.g. ONLY="cifar100 eurosat"
#   LORM_JAX         (optional) the command, default lorm-jax
#   EXTRA            (optional) extra flags appended to every run, e.g. EXTRA="--config.backbone.options.compute_dtype=bfloat16"
#   DRY_RUN=1        print the commands instead of running them
#
# Runs are resumable: re-running the script continues unfinished runs and skips finished ones (results.json).
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ "${DRY_RUN:-0}" != "1" ]]; then
  : "${VIT_NPZ:?set VIT_NPZ to the ViT-B/16 AugReg in21k .npz (see docs/PAPER_SETUP.md)}"
  : "${TFDS_DIR:?set TFDS_DIR to the TFDS data_dir with the prepared datasets (see docs/PAPER_SETUP.md)}"
fi
VIT_NPZ="${VIT_NPZ:-/path/to/ViT-B_16-augreg-in21k.npz}"
TFDS_DIR="${TFDS_DIR:-/path/to/tensorflow_datasets}"
RUNS="${RUNS:-runs/paper}"
LORM_JAX="${LORM_JAX:-lorm-jax}"
EXTRA="${EXTRA:-}"
ONLY="${ONLY:-}"

# dataset  β values (LORM_SPEC §10.5)
RUN_LIST=(
  "cifar100 0.5"   "cifar100 0.1"   "cifar100 0.05"
  "imagenet_r 0.5" "imagenet_r 0.1" "imagenet_r 0.05"
  "imagenet_a 1"   "imagenet_a 0.5" "imagenet_a 0.2"
  "cub200 1"       "cub200 0.5"     "cub200 0.2"
  "cars196 1"      "cars196 0.5"    "cars196 0.2"
  "eurosat 1"      "eurosat 0.5"    "eurosat 0.2"
)

for entry in "${RUN_LIST[@]}"; do
  read -r dataset beta <<< "$entry"
  if [[ -n "$ONLY" && " $ONLY " != *" $dataset "* ]]; then
    continue
  fi
  cmd=("$LORM_JAX" run "--config=configs/paper/${dataset}.py:${beta}"
       "--config.backbone.options.path=${VIT_NPZ}"
       "--config.data.options.data_dir=${TFDS_DIR}")
  if [[ "$dataset" == "cars196" && -n "${CARS_MANUAL_DIR:-}" ]]; then
    cmd+=("--config.data.options.manual_dir=${CARS_MANUAL_DIR}")
  fi
  cmd+=(--workdir "${RUNS}/${dataset}_b${beta}")
  # shellcheck disable=SC2206  # EXTRA is deliberately word-split into flags
  cmd+=($EXTRA)
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    echo "${cmd[*]}"
  else
    echo ">>> ${cmd[*]}"
    "${cmd[@]}"
  fi
done
