# Shared by the Slurm job scripts: run one Python entry point on this node, forward Slurm's
# preemption signal to it, and requeue the job when it exits with code 3 ("checkpoint saved,
# stopped early"). Outside Slurm it simply runs the command with `uv run`.
#
#   source slurm/lib.sh
#   run_requeueable python -m train.pretrain --config configs/pretrain_cmht.toml

run_requeueable() {
    set -uo pipefail
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
    export PYTHONUNBUFFERED=1
    local launch
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        # the CUDA build of jaxlib (uv.lock pins it); --frozen: never re-resolve on a compute node
        uv sync --frozen --extra cuda13 || return 1
        launch=(srun --kill-on-bad-exit=1 uv run --frozen --extra cuda13)
        echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname): $*"
    else
        launch=(uv run)
    fi

    "${launch[@]}" "$@" &
    local child=$!
    # shellcheck disable=SC2064
    trap "echo \"\$(date -u +%FT%TZ) got USR1: asking $1 to checkpoint and stop\"; kill -s USR1 $child 2>/dev/null" USR1
    # shellcheck disable=SC2064
    trap "echo \"\$(date -u +%FT%TZ) got TERM: asking $1 to checkpoint and stop\"; kill -s TERM $child 2>/dev/null" TERM

    # `wait` returns early when a trapped signal arrives: keep waiting for the child itself.
    local code
    while true; do
        wait "$child"
        code=$?
        kill -0 "$child" 2>/dev/null || break
    done
    if [[ $code -eq 3 && -n "${SLURM_JOB_ID:-}" ]]; then
        echo "checkpoint saved; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$code"
}
