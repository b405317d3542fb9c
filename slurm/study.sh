#!/bin/bash
# The pretraining study (python -m rl.study) on a Slurm cluster: three jobs.
#
#   bash slurm/study.sh configs/study_cluster.toml                         # on a login node
#   bash slurm/study.sh configs/study_cluster.toml --set data.cache=/scratch/$USER/data_cache
#
# Run with bash on a login node, it submits
#   1. pretrain: the data units (if any), a track pool's maps (if any, on the job's 32 CPUs),
#      the pretraining, its probe and the domain gap — one node, 4 GPUs, one process
#      (`rl.study --stage data,tracks,pretrain,probe,gap`), requeued on preemption;
#   2. task: an array of arm × seed tasks after (1) succeeded (afterok), one GPU each; task i
#      trains arm × seed number i and evaluates it (`rl.study --task i`; `--count` says how
#      many there are: arms × seeds), requeued on preemption;
#   3. report: `rl.study --stage report` after the whole array (afterany: a task that failed
#      is named as missing in the report, not silently dropped).
# Every job runs rl.study, which skips each unit its completion marker says is done (and
# rl.ppo / train.pretrain resume from their checkpoints): submitting again resumes the study.
# By hand: `sbatch slurm/study.sh --job pretrain C`, `sbatch --array=0-49 slurm/study.sh
# --job task C`, `sbatch slurm/study.sh --job report C`.
#
# Without Slurm (no sbatch on PATH, or STUDY_LOCAL=1), or submitted directly with
# `sbatch slurm/study.sh C`, the whole study runs in this one shell or job:
#
#   bash slurm/study.sh configs/study_cpu.toml
#
# Preemption / time limit: SIGUSR1 300 s before the end; the running unit saves, rl.study
# exits with code 3 and the job requeues itself (slurm/lib.sh).
#
# Another cluster: change only the --partition, --account and --gres lines (and the module
# line in slurm/lib.sh); the pretrain job's GPUs are in PRETRAIN_GRES below.
#SBATCH --job-name=raceformer-study
#SBATCH --partition=gpu
##SBATCH --account=your_account
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:a100:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=1-00:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%A_%a.out

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}" || exit 1
mkdir -p slurm/logs

JOB=""
if [[ "${1:-}" == --job ]]; then
    JOB="${2:-}"
    shift 2
fi
CONFIG="${1:-configs/study_cluster.toml}"
shift $(( $# > 0 ? 1 : 0 ))
PRETRAIN_GRES="${PRETRAIN_GRES:-gpu:a100:4}"

source slurm/lib.sh

case "$JOB" in
    pretrain)
        run_requeueable python -m rl.study --config "$CONFIG" "$@" --stage data,tracks,pretrain,probe,gap
        exit $? ;;
    task)
        if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
            echo "slurm/study.sh: --job task is an array job (sbatch --array=0-N)" >&2
            exit 2
        fi
        run_requeueable python -m rl.study --config "$CONFIG" "$@" --task "$SLURM_ARRAY_TASK_ID"
        exit $? ;;
    report)
        run_requeueable python -m rl.study --config "$CONFIG" "$@" --stage report
        exit $? ;;
    "") ;;
    *)
        echo "slurm/study.sh: --job $JOB: expected pretrain, task or report" >&2
        exit 2 ;;
esac

if [[ -n "${SLURM_JOB_ID:-}" || "${STUDY_LOCAL:-0}" == 1 ]] || ! command -v sbatch >/dev/null; then
    [[ -n "${SLURM_JOB_ID:-}" ]] || echo "slurm/study.sh: no Slurm here (no sbatch, or" \
        "STUDY_LOCAL=1): the whole study in this shell"
    run_requeueable python -m rl.study --config "$CONFIG" "$@"
    exit $?
fi

# On the login node: count the arm × seed tasks, submit the three jobs.
if [[ -z "${TASKS:-}" ]]; then
    TASKS=$(uv run --frozen python -m rl.study --config "$CONFIG" "$@" --count) || exit 2
fi
if ! [[ "$TASKS" =~ ^[0-9]+$ ]] || (( TASKS < 1 )); then
    echo "slurm/study.sh: $CONFIG: expected a number of arm × seed tasks, got '$TASKS'" >&2
    exit 2
fi
pre=$(sbatch --parsable --job-name=raceformer-study-pretrain --gres="$PRETRAIN_GRES" \
    --cpus-per-task=32 --mem=180G --time=2-00:00:00 "$0" --job pretrain "$CONFIG" "$@") || exit 1
arr=$(sbatch --parsable --dependency="afterok:${pre}" --array="0-$((TASKS - 1))" \
    --job-name=raceformer-study-task "$0" --job task "$CONFIG" "$@") || exit 1
rep=$(sbatch --parsable --dependency="afterany:${arr}" --job-name=raceformer-study-report \
    --time=04:00:00 "$0" --job report "$CONFIG" "$@") || exit 1
echo "submitted the study $CONFIG: pretraining $pre, $TASKS arm × seed tasks $arr, report" \
     "$rep; logs in slurm/logs/"
