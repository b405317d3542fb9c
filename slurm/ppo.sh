#!/bin/bash
# PPO on one Amarel node (4×A100), requeued on preemption; resumes from runs/{run_name}/ckpt.
#
#   sbatch slurm/ppo.sh                                        # configs/rl_racecar.toml
#   sbatch slurm/ppo.sh configs/rl_multimodal.toml --set finetune.freeze_encoders=false
#   RACEFORMER_EXTRA=cpu sbatch slurm/ppo.sh ...               # a CPU-only Slurm (drop --gres)
#   bash slurm/ppo.sh configs/rl_tiny.toml                     # no Slurm: whatever devices exist
#
# One process drives the node's GPUs: the JAX backend shards its environments over them (a 1-D
# "data" mesh). rl.ppo is single-process, so this script refuses more than one node or task
# (scale out with more runs, e.g. one per seed, not with --nodes). The PyBullet backend
# (env.backend = "bullet") is CPU-bound: give it the CPUs instead (env.bullet_workers = cpus)
# and one GPU.
#
# Preemption / time limit: SIGUSR1 300 s before the end; rl.ppo saves a checkpoint, exits with
# code 3 and the job requeues itself (one log, appended).
#
# Another cluster: change only the --partition, --account and --gres lines (and the module
# line in slurm/lib.sh).
#SBATCH --job-name=raceformer-ppo
#SBATCH --partition=gpu
##SBATCH --account=your_account
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
if [[ "${SLURM_NTASKS:-1}" != 1 ]]; then
    echo "slurm/ppo.sh: rl.ppo is one process; got ${SLURM_NTASKS} tasks on" \
         "${SLURM_NNODES:-1} node(s): submit with --nodes=1 --ntasks-per-node=1" >&2
    exit 2
fi
CONFIG="${1:-configs/rl_racecar.toml}"
shift $(( $# > 0 ? 1 : 0 ))

source slurm/lib.sh
run_requeueable python -m rl.ppo --config "$CONFIG" "$@"
exit $?
