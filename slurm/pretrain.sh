#!/bin/bash
# Masked multimodal pretraining: one Amarel node with 4×A100 by default, requeued on preemption.
#
#   sbatch slurm/pretrain.sh                                   # configs/pretrain_cmht.toml
#   sbatch slurm/pretrain.sh configs/pretrain_cmht.toml --set training.steps=20000
#   sbatch --nodes=4 slurm/pretrain.sh                         # 4 nodes, 16 GPUs
#   RACEFORMER_EXTRA=cpu sbatch slurm/pretrain.sh ...          # a CPU-only Slurm (drop --gres)
#   bash slurm/pretrain.sh configs/pretrain_tiny.toml          # no Slurm: whatever devices exist
#
# One process per GPU (as JAX prefers under Slurm: --ntasks-per-node = GPUs per node, each task
# sees all of the node's GPUs and takes the one of its SLURM_LOCALID; do not add
# --gpus-per-task). With more than one task, train.pretrain calls jax.distributed.initialize(),
# which reads the Slurm environment; the batch is split over every process's device.
#
# Preemption / time limit: Slurm sends SIGUSR1 to this script 300 s before the end (--signal=B:);
# the trap forwards it (through srun) to every process, which saves a checkpoint and exits with
# code 3; the job then requeues itself and resumes from runs/{run_name}/ckpt exactly. The log
# (--open-mode=append) keeps every restart of the job in one file.
#
# Another cluster: change only the --partition, --account and --gres lines (and the module
# line in slurm/lib.sh).
#SBATCH --job-name=raceformer-pretrain
#SBATCH --partition=gpu
##SBATCH --account=your_account
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gres=gpu:a100:4
#SBATCH --cpus-per-task=8
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
