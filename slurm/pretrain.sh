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

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}" || exit 1
mkdir -p slurm/logs

CONFIG="${1:-configs/pretrain_cmht.toml}"
shift $(( $# > 0 ? 1 : 0 ))

source slurm/lib.sh
run_requeueable python -m train.pretrain --config "$CONFIG" "$@"
exit $?
