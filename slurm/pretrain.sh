#!/bin/bash
# Masked multimodal pretraining on one Amarel node with 4×A100, requeued on preemption.
#
#   sbatch slurm/pretrain.sh                                   # configs/pretrain_cmht.toml
#   sbatch slurm/pretrain.sh configs/pretrain_cmht.toml --set training.steps=20000
#   bash slurm/pretrain.sh configs/pretrain_tiny.toml          # no Slurm: whatever devices exist
#
# One task drives the node's 4 GPUs (one JAX process, a 4-device data-parallel mesh). For several
# nodes raise --nodes and set --ntasks-per-node=1: train.pretrain then calls
# jax.distributed.initialize(), which reads the Slurm environment.
#
# Preemption / time limit: Slurm sends SIGUSR1 to this script 300 s before the end (--signal=B:);
# the trap forwards it to the trainer, which saves a checkpoint and exits with code 3; the job
# then requeues itself and resumes from runs/{run_name}/ckpt exactly.
#
#SBATCH --job-name=raceformer-pretrain
#SBATCH --partition=gpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:a100:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=180G
#SBATCH --time=2-00:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
mkdir -p slurm/logs

CONFIG="${1:-configs/pretrain_cmht.toml}"
shift $(( $# > 0 ? 1 : 0 ))

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export PYTHONUNBUFFERED=1

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # the CUDA build of jaxlib (uv.lock pins it); --frozen: never re-resolve on a compute node
    uv sync --frozen --extra cuda13 || exit 1
    LAUNCH=(srun --kill-on-bad-exit=1 uv run --frozen --extra cuda13)
    echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $CONFIG $*"
else
    LAUNCH=(uv run)
fi

"${LAUNCH[@]}" python -m train.pretrain --config "$CONFIG" "$@" &
TRAINER=$!

forward() {
    echo "$(date -u +%FT%TZ) got $1: asking the trainer to checkpoint and stop"
    kill -s "$1" "$TRAINER" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early when a trapped signal arrives: keep waiting for the trainer itself.
while true; do
    wait "$TRAINER"
    CODE=$?
    kill -0 "$TRAINER" 2>/dev/null || break
done

if [[ $CODE -eq 3 && -n "${SLURM_JOB_ID:-}" ]]; then
    echo "checkpoint saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$CODE"
