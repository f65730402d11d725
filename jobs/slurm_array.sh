#!/bin/bash
# A per-case stage (prepare, repair, stage2, decode or report) over a SLURM array of n shards, then one merge step.
# Run from the repository root (paths are relative to it; mkdir -p logs); n = 8 here, any n works:
#   a=$(sbatch --parsable --array=0-7 jobs/slurm_array.sh stage2 params/default.yaml outputs/full)
#   m=$(sbatch --parsable --dependency=afterany:$a jobs/slurm_array.sh stage2 params/default.yaml outputs/full)
#   then the report the same way, after the merge: sbatch --dependency=afterok:$m --array=0-7 ... report ...
# decode (stage 3's decoding and scoring) runs the same way once stage 3's fit (torchrun, `nearfix stage3`)
# wrote <run>/stage3/unified.pt; its parts are <run>/stage3/parts/, its tables stage3/scores.csv.
# Shards are 0-based (--array=0-(n-1)); task i takes every n-th case from the i-th.
#SBATCH --job-name=nearfix-shard
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
# A task whose node fails or is preempted is queued again with the same index and resumes: every
# case it finished left parts/<case>.json in the stage's folder (<run>/prepared, stage2, stage3 or report)
# and is not computed again.
#SBATCH --requeue
source activate nearfix  # or: source .venv/bin/activate
set -euo pipefail
STAGE=${1:?prepare, repair, stage2, decode or report}; PARAMS=${2:?params file}; RUN=${3:?run folder}
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    # one shard, on cpus-per-task worker processes; the task that finishes the last case writes the tables
    nearfix run "$STAGE" --params "$PARAMS" --run-dir "$RUN" --workers "${SLURM_CPUS_PER_TASK:-1}" \
        --no-progress --shard "$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"
else
    # the merge step (submitted without --array): writes the tables, or names the missing cases and fails
    nearfix merge "$STAGE" --run-dir "$RUN"
fi
