#!/bin/bash
# DINOv2 pretraining on SLURM, as in the paper: 3 nodes x 8 GPUs, one task per GPU (FSDP).
#
#   mkdir -p logs
#   DATASET_PATH="WSICoords:slides=/data/slides:coords=/data/patches/coords" \
#   OUTPUT_DIR=/scratch/$USER/mv_hybrid sbatch dino/Train_MVHybrid_DINOv2_SLURM.sh [key=value ...]
#
# Submit from the repository root. Environment variables:
#   DATASET_PATH  (required) dataset string for train.dataset_path, e.g. Folder:root=/data/pngs
#   OUTPUT_DIR    (required) checkpoints and logs; a requeued job resumes from here
#   ARCH          backbone whose paper recipe to train: configs/train/$ARCH.yaml (default mv_hybrid; any of
#                 mv_hybrid vit_12 vit_24 vim_einfft hydra_einfft hydra_hybrid)
#   CONFIG        experiment yaml (default configs/train/$ARCH.yaml)
#   PYTHON        interpreter with the package installed (default: python on PATH)
#   REPO_DIR      repository root (default: the directory sbatch was called from)
# Arguments to this script are passed to the trainer as extra key=value overrides.
# Rank, world size and the master address come from SLURM's variables (dino/distributed).
#
# Time limit / preemption: SLURM signals this shell with USR1 120 s before the end
# (--signal=B:USR1@120). The shell forwards USR1 to the training tasks through srun; the trainer
# writes its checkpoint and then requeues the job itself (--requeue; dino/utils/preemption.py, the
# same path as submitit's), so a trainer that fails is not requeued.
# Another backbone: ARCH=vit_12 sbatch --job-name=dinov2-vit_12 dino/Train_MVHybrid_DINOv2_SLURM.sh
#SBATCH --job-name=mvhybrid-dinov2
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err

set -uo pipefail

die() {
    echo "Train_MVHybrid_DINOv2_SLURM.sh: error: $*" >&2
    exit 2
}

[[ -n "${DATASET_PATH:-}" ]] || die "DATASET_PATH is not set; e.g. DATASET_PATH='WSICoords:slides=/data/slides:coords=/data/patches/coords' or 'Folder:root=/data/pngs'"
[[ -n "${OUTPUT_DIR:-}" ]] || die "OUTPUT_DIR is not set; it holds the checkpoints a requeued job resumes from"
CONFIG="${CONFIG:-configs/train/${ARCH:-mv_hybrid}.yaml}"
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}"
PYTHON="${PYTHON:-python}"

cd "$REPO_DIR" || die "cannot cd to REPO_DIR=$REPO_DIR"
[[ -f "$CONFIG" ]] || die "config file not found: $CONFIG (relative to $REPO_DIR; set CONFIG or REPO_DIR)"
mkdir -p "$OUTPUT_DIR" || die "cannot create OUTPUT_DIR=$OUTPUT_DIR"
# One data-loading thread pool per task, sized to the task's CPUs.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

echo "$(date -Is) job ${SLURM_JOB_ID:-local} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}: $CONFIG -> $OUTPUT_DIR"

SRUN_PID=""
forward_to_trainer() {
    echo "$(date -Is) caught USR1: asking the trainer to checkpoint and requeue the job"
    [[ -n "$SRUN_PID" ]] && kill -USR1 "$SRUN_PID" 2>/dev/null  # srun relays the signal to every task
}
trap forward_to_trainer USR1

# In the background so that the shell can run its USR1 trap while the job step is running.
srun --kill-on-bad-exit=1 "$PYTHON" -m dino.train \
    --config-file "$CONFIG" \
    --output-dir "$OUTPUT_DIR" \
    "train.dataset_path=$DATASET_PATH" \
    "$@" &
SRUN_PID=$!
# A trapped signal interrupts `wait` (status > 128): wait again until the job step has really ended.
while true; do
    wait "$SRUN_PID"
    status=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
echo "$(date -Is) training finished with status $status"
exit "$status"
