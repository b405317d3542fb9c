#!/bin/bash
# PPO on one Amarel node (4×A100), requeued on preemption; resumes from runs/{run_name}/ckpt.
#
#   sbatch slurm/ppo.sh                                        # configs/rl_racecar.toml
#   sbatch slurm/ppo.sh configs/rl_multimodal.toml --set finetune.freeze_encoders=false
#   bash slurm/ppo.sh configs/rl_tiny.toml                     # no Slurm: whatever devices exist
#
# The JAX backend shards its environments over the node's 4 GPUs (one process, a 1-D "data"
# mesh). The PyBullet backend (env.backend = "bullet") is CPU-bound: give it the CPUs instead
# (env.bullet_workers = cpus) and one GPU.
#
#SBATCH --job-name=raceformer-ppo
#SBATCH --partition=gpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:a100:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=128G
#SBATCH --time=1-00:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}" || exit 1
mkdir -p slurm/logs
CONFIG="${1:-configs/rl_racecar.toml}"
shift $(( $# > 0 ? 1 : 0 ))

source slurm/lib.sh
run_requeueable python -m rl.ppo --config "$CONFIG" "$@"
exit $?
