# Shared by the Slurm job scripts: pick the Python environment, run one Python entry point
# (under Slurm: `srun`, one process per task), forward Slurm's early-warning signal to it, and
# requeue the job when it exits with code 3 ("checkpoint saved, stopped early"). Outside Slurm
# (`bash slurm/<job>.sh`) the same command runs here with `uv run`.
#
#   source slurm/lib.sh
#   run_requeueable python -m train.pretrain --config configs/pretrain_cmht.toml
#   run_requeueable --kill python -m etl.build ...   # no checkpointing: on the signal, stop
#                                                    # the command and requeue (it resumes)
#
# RACEFORMER_EXTRA picks the jaxlib build: cuda13 (the default under Slurm: `uv sync --extra
# cuda13`, JAX_PLATFORMS=cuda so a node without GPUs fails instead of crawling on its CPU) or
# cpu (the default outside Slurm; on a CPU-only cluster: `RACEFORMER_EXTRA=cpu sbatch ...`).
#
# On a cluster other than Amarel, change only the #SBATCH --partition, --account and --gres
# lines of the job scripts, and the `module load` line below if your site needs one.

raceformer_env() {
    # module load ...   # site modules, if any (Amarel needs none: the CUDA wheels carry CUDA)
    local extra="${RACEFORMER_EXTRA:-}"
    if [[ -z "$extra" ]]; then
        if [[ -n "${SLURM_JOB_ID:-}" ]]; then extra=cuda13; else extra=cpu; fi
    fi
    case "$extra" in
        cpu)
            RF_EXTRA_ARGS=()
            if [[ -n "${RACEFORMER_EXTRA:-}" ]]; then export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"; fi
            ;;
        cuda13)
            RF_EXTRA_ARGS=(--extra cuda13)
            export JAX_PLATFORMS="${JAX_PLATFORMS:-cuda}"
            ;;
        *)
            echo "slurm/lib.sh: RACEFORMER_EXTRA=$extra: expected cuda13 or cpu" >&2
            return 2
            ;;
    esac
    export RACEFORMER_EXTRA="$extra"
}

_rf_pass() {  # a trap: signal $1 arrived; pass $2 on to the child (or when it starts)
    echo "$(date -u +%FT%TZ) got $1: stopping $_rf_what (sending $2)"
    _rf_signalled=$2
    if [[ -n "$_rf_child" ]]; then kill -s "$2" "$_rf_child" 2>/dev/null; fi
}

run_requeueable() {
    set +e -uo pipefail  # the child's exit code is handled below, not by `set -e`
    local kill_on_signal=0
    if [[ "${1:-}" == "--kill" ]]; then kill_on_signal=1; shift; fi
    raceformer_env || return $?
    export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
    export PYTHONUNBUFFERED=1
    local launch
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        # once, on the first node (the environment is on the shared file system); --frozen:
        # never re-resolve on a compute node; --inexact: leave other extras (dev) installed
        uv sync --frozen --inexact "${RF_EXTRA_ARGS[@]}" || return 1
        # srun does not inherit --cpus-per-task from sbatch (Slurm ≥ 22.05)
        export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"
        # one process per task (#SBATCH --ntasks-per-node); with several, the program calls
        # jax.distributed.initialize(), which reads the Slurm environment
        launch=(srun --kill-on-bad-exit=1 uv run --frozen --no-sync)
        echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname)," \
             "${SLURM_NNODES:-1} node(s), ${SLURM_NTASKS:-1} task(s), $RACEFORMER_EXTRA: $*"
    else
        launch=(uv run --frozen "${RF_EXTRA_ARGS[@]}")
    fi

    # The traps go up before the child starts, so an early signal is not lost (it is passed on
    # as soon as the child exists).
    _rf_child="" _rf_signalled="" _rf_what="$1"
    _rf_forward=USR1
    [[ $kill_on_signal -eq 0 ]] || _rf_forward=TERM
    trap '_rf_pass USR1 "$_rf_forward"' USR1
    trap '_rf_pass TERM TERM' TERM
    "${launch[@]}" "$@" &
    _rf_child=$!
    local child=$_rf_child
    if [[ -n "$_rf_signalled" ]]; then kill -s "$_rf_signalled" "$child" 2>/dev/null; fi

    # `wait` returns early when a trapped signal arrives: keep waiting for the child itself.
    local code
    while true; do
        wait "$child"
        code=$?
        kill -0 "$child" 2>/dev/null || break
    done
    trap - USR1 TERM
    if [[ $kill_on_signal -eq 1 && -n "$_rf_signalled" ]]; then
        code=3  # stopped on purpose; what is finished stays finished (completion markers)
    elif [[ -n "$_rf_signalled" && $code -gt 128 ]]; then
        # killed by a signal after we passed on the stop: a process that had not yet set up its
        # handler, or one srun ended (--kill-on-bad-exit) when another exited 3 first. Requeue:
        # the rerun resumes from the newest intact checkpoint.
        echo "$(date -u +%FT%TZ) $_rf_what died of signal $((code - 128)) after the stop: requeueing"
        code=3
    fi
    if [[ $code -eq 3 && -n "${SLURM_JOB_ID:-}" ]]; then
        echo "stopped early (exit 3); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$code"
}
