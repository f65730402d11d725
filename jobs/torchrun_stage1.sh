#!/bin/bash
# Stage 1 on GPUs: one SLURM array task per class, each fitting its class's field on all the GPUs of
# one node under torchrun (DistributedDataParallel). The masks of every class are written after all
# fits, per case, by the repair stage (each case read once for all classes; CPU nodes will do).
# Run from the repository root (paths are relative to it; mkdir -p logs) after prepare, one task per
# class the run fits (stage1.classes, else the class table's order; 10 for the cardiac table):
#   sbatch --array=0-9 --gres=gpu:4 jobs/torchrun_stage1.sh params/default.yaml outputs/full
#   then the repair, as a per-case array (jobs/slurm_array.sh repair ...) with --dependency=afterok:<this job's id>
#   (without --fit-only below, each task writes its class's masks itself, the cases shared over its ranks)
# Array task i fits the i-th class (0-based: stage1 --nth $SLURM_ARRAY_TASK_ID). train.cases_per_batch
# must split evenly over the node's GPUs (e.g. 4 cases on 1, 2 or 4 GPUs).
#SBATCH --job-name=nearfix-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
# A task whose node fails or is preempted is queued again with the same index and resumes exactly
# from <run>/stage1/<key>/ckpt/last.pt (weights, optimiser, sampler and RNG state); the per-case
# store stage1/<key>/cases/ is not rewritten, and a finished fit is loaded, not retrained.
#SBATCH --requeue
source activate nearfix  # or: source .venv/bin/activate
set -euo pipefail
PARAMS=${1:?params file}; RUN=${2:?run folder}
: "${SLURM_ARRAY_TASK_ID:?submit as an array, one task per class: sbatch --array=0-9 ...}"
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-1} / ${SLURM_GPUS_ON_NODE:-1} ))
torchrun --standalone --nproc_per_node="${SLURM_GPUS_ON_NODE:-1}" -m nearfix_lib.stages.stage1 \
    --params "$PARAMS" --run-dir "$RUN" --device cuda --nth "$SLURM_ARRAY_TASK_ID" --fit-only --no-progress
