#!/bin/bash
# Stage 3 on GPUs: the unified fit on all the GPUs of one node under torchrun (DistributedDataParallel);
# rank 0 then fits the thresholds and writes <run>/stage3/unified.pt.
# Run from the repository root (paths are relative to it; mkdir -p logs) after stage 2:
#   sbatch --gres=gpu:4 jobs/torchrun_stage3.sh params/default.yaml outputs/full
# train.cases_per_batch of stage3 must split evenly over the node's GPUs. Decoding and scoring
# (notebook 04) come after, from unified.pt.
#SBATCH --job-name=nearfix-stage3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
# A job whose node fails or is preempted is queued again and resumes exactly from
# <run>/stage3/ckpt/last.pt; the per-case store stage3/cases/ is not rewritten.
#SBATCH --requeue
source activate nearfix  # or: source .venv/bin/activate
set -euo pipefail
PARAMS=${1:?params file}; RUN=${2:?run folder}
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-1} / ${SLURM_GPUS_ON_NODE:-1} ))
torchrun --standalone --nproc_per_node="${SLURM_GPUS_ON_NODE:-1}" -m nearfix_lib.stages.stage3 \
    --params "$PARAMS" --run-dir "$RUN" --device cuda
