#!/bin/bash
# The whole pipeline on SLURM, each step submitted to wait for the one before it:
#   prepare (array of shards) -> stage-1 fits (torchrun, one array task per class) -> repair (shards)
#   -> stage 2 (shards) -> stage-3 fit (torchrun) -> decode (shards) -> report (shards).
# Every per-case step is jobs/slurm_array.sh as an array of N_SHARDS tasks plus its merge job, and a
# step starts only once the merge before it succeeded (afterok): a merge that finds cases missing
# fails, names them in its log, and holds the rest of the chain. Run from the repository root:
#   bash jobs/submit_all.sh params/default.yaml outputs/full [N_SHARDS]
# Every job resumes where it stopped (done cases, last.pt), so after a failure fix the cause and run
# this script again: finished work is found and not repeated. The notebooks (inspection, figures,
# the new-case demo, the report's figures) read the finished run afterwards, e.g. with papermill.
# Adapt the #SBATCH lines (partition, GPUs, time) in the three job scripts to your cluster.
set -euo pipefail
PARAMS=${1:?params file}; RUN=${2:?run folder}; N_SHARDS=${3:-8}
mkdir -p logs
# the classes the run fits (stage1.classes, else the class table): one stage-1 array task each
N_CLASSES=$(python -m nearfix_lib.stages.stage1 --params "$PARAMS" --run-dir "$RUN" --list | wc -l)

after() { [[ -n "${1:-}" ]] && echo "--dependency=afterok:$1" || true; }

per_case() {  # STAGE [JOB TO WAIT FOR] -> the id of the stage's merge job
    local shards
    shards=$(sbatch --parsable $(after "${2:-}") --array=0-$((N_SHARDS - 1)) jobs/slurm_array.sh "$1" "$PARAMS" "$RUN")
    sbatch --parsable --dependency=afterany:"$shards" jobs/slurm_array.sh "$1" "$PARAMS" "$RUN"
}

prepare=$(per_case prepare)
fits=$(sbatch --parsable $(after "$prepare") --array=0-$((N_CLASSES - 1)) jobs/torchrun_stage1.sh "$PARAMS" "$RUN")
repair=$(per_case repair "$fits")
stage2=$(per_case stage2 "$repair")
stage3=$(sbatch --parsable $(after "$stage2") jobs/torchrun_stage3.sh "$PARAMS" "$RUN")
decode=$(per_case decode "$stage3")
report=$(per_case report "$decode")
echo "submitted: prepare $prepare, stage-1 fits $fits ($N_CLASSES classes), repair $repair, stage 2 $stage2," \
     "stage-3 fit $stage3, decode $decode, report $report (merge job ids; logs in logs/)"
