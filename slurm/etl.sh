#!/usr/bin/env bash
# The CMHT ETL on a Slurm cluster: one array task per group of drives, then one merge step.
#
#   SRC=/scratch/cmht_raw OUT=/scratch/data_cache bash slurm/etl.sh     # on a login node
#   SRC=... OUT=... ETL_GROUPS=32 CONFIG=configs/etl.toml bash slurm/etl.sh
#   SRC=... OUT=... bash slurm/etl.sh --partition=cpu --cpus-per-task=4 --mem=8G
#
# Run with bash on a login node, it submits the array job (ETL_GROUPS tasks) and a merge job
# that depends on it (afterany: the merge runs even when some drives failed, and reports
# them); sbatch options given to it go to both, over the #SBATCH lines. Task i builds drives i::ETL_GROUPS (sorted by drive id) into $OUT/drives/<hash>/; each
# drive's completion marker makes reruns skip finished drives, so a resubmission resumes.
# The merge step writes $OUT/manifest.json and $OUT/index.parquet from the per-drive outputs:
#
#   python -m etl.build --src $SRC --out $OUT --merge-only
#
# By hand: `sbatch --array=0-15 slurm/etl.sh` (the array) and, after it,
# `sbatch --array=0-0 slurm/etl.sh --merge`.
#
# Without Slurm (no sbatch on PATH, or ETL_LOCAL=1) it builds every drive and merges, here:
#
#   SRC=cmht_raw OUT=data_cache bash slurm/etl.sh
#
# Preemption / time limit: SIGUSR1 300 s before the end stops the task and requeues it; the
# drives it finished are skipped on the rerun (their markers), the one it was on is rebuilt.
#
# Expected: ~N_frames / (frames/s per worker × CPUS × ETL_GROUPS) wall time for the array (see
# benchmarks/etl.py for frames/s per worker on your nodes); the merge takes seconds.
#
# Another cluster: change only the --partition and --account lines (CPU nodes; no --gres).
#SBATCH --job-name=raceformer-etl
##SBATCH --partition=main
##SBATCH --account=your_account
#SBATCH --array=0-15
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/etl-%A_%a.out

set -euo pipefail

SRC=${SRC:-cmht_raw}
OUT=${OUT:-data_cache}
CONFIG=${CONFIG:-}
ETL_GROUPS=${ETL_GROUPS:-16}
EXTRA=${EXTRA:-}  # e.g. "--set output.split=drive --strict"
cfg_args=()
if [[ -n "$CONFIG" ]]; then cfg_args=(--config "$CONFIG"); fi
# shellcheck disable=SC2206
extra_args=($EXTRA)

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
mkdir -p slurm/logs
export RACEFORMER_EXTRA="${RACEFORMER_EXTRA:-cpu}"  # the ETL needs no GPU
source slurm/lib.sh

if [[ "${1:-}" == "--merge" ]]; then
  run_requeueable --kill python -m etl.build --src "$SRC" --out "$OUT" --merge-only \
    "${cfg_args[@]}" "${extra_args[@]}"
  exit $?
fi

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  if [[ "${ETL_LOCAL:-0}" == 1 ]] || ! command -v sbatch >/dev/null; then
    echo "slurm/etl.sh: no Slurm here (no sbatch, or ETL_LOCAL=1): building every drive of" \
         "$SRC into $OUT in this shell"
    run_requeueable python -m etl.build --src "$SRC" --out "$OUT" "${cfg_args[@]}" \
      "${extra_args[@]}" --workers "${WORKERS:-$(nproc)}"
    exit $?
  fi
  # On the login node: submit the array and the merge that waits for it; the options given
  # here ("$@": partition, account, resources) go to both, after the merge's own defaults.
  # The settings travel in the environment (--export=ALL), not in --export's list, which
  # would split a value at its commas (EXTRA="--set preprocess.image.rgb_size=[32,32]").
  export SRC OUT CONFIG ETL_GROUPS EXTRA
  array_id=$(sbatch --parsable "$@" --array="0-$((ETL_GROUPS - 1))" --export=ALL "$0") \
    || exit $?
  sbatch --cpus-per-task=2 --mem=8G --time=00:30:00 --output=slurm/logs/etl-merge-%j.out "$@" \
    --dependency="afterany:${array_id}" --job-name=raceformer-etl-merge --array=0-0 \
    --export=ALL "$0" --merge || exit $?
  echo "submitted ETL array ${array_id} (${ETL_GROUPS} tasks) and its merge; logs in slurm/logs/"
  exit 0
fi

task=${SLURM_ARRAY_TASK_ID:-0}
count=${SLURM_ARRAY_TASK_COUNT:-$ETL_GROUPS}
# Workers per task = the CPUs Slurm gave it. Exit code 1 = some drive of this group failed
# (reported in the merge); the other tasks and the merge still run.
run_requeueable --kill python -m etl.build --src "$SRC" --out "$OUT" "${cfg_args[@]}" \
  "${extra_args[@]}" --workers "${SLURM_CPUS_PER_TASK:-1}" --shard-index "$task" \
  --num-shards "$count" --no-progress
exit $?
